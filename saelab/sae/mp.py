"""Matching-pursuit SAE (MP-SAE; Costa et al. 2025, "From Flat to Hierarchical: Extracting Sparse Representations
with Matching Pursuit", arXiv 2506.03093): the encoder is k greedy steps of matching pursuit over the decoder's own
unit-norm rows (the dictionary is shared: there is no encoder matrix).

    r₀ = x − b_dec
    step t = 1 … k:   j_t = argmax_j ⟨r_{t−1}, W_dec,j⟩          the largest inner product (not the largest |·|)
                      c_t = ReLU(⟨r_{t−1}, W_dec,j_t⟩)            f_{j_t} += c_t
                      r_t = r_{t−1} − c_t · W_dec,j_t
    x̂ = f W_dec + b_dec  (= x − r_k)

**Selection.** The largest inner product, as the authors' implementation picks it (no absolute value), so the codes
are non-negative like every other SAE's here; the ReLU only acts when every inner product is ≤ 0 (the step then adds
nothing). Since r_t ⊥ W_dec,j_t the next step never takes the same atom; a later one may, and adds to its code, so
L0 ≤ k.

**Gradients.** Training backpropagates through the unrolled steps, as the paper does: the choice j_t is an argmax
and passes no gradient; the coefficients c_t do, through r_{t−1} (so through b_dec and every earlier chosen row and
coefficient) and through the chosen row itself, and so do the rows in x̂. The selection's [B, d_sae] inner products
are computed without autograd; each step keeps only [B, d_in] tensors for the backward. The loss is ‖x − x̂‖²
plus, while latents are dead, an aux term: the top ``--k-aux`` dead atoms by their inner product with the detached
final residual (the pursuit continued over them) reconstruct that residual, scaled as the TopK aux-k loss is
(coefficient ``--aux-coeff``, times min(n_dead / k_aux, 1)).

**Adaptive sparsity** (``--mp-residual`` τ, inference only: ``encode``): a token's pursuit stops before step t once
‖r_{t−1}‖ < τ·‖r₀‖, so a token that its first atoms explain uses fewer than k. Training always takes k steps.

**Tied.** ``W_enc`` is ``W_dec.T`` (read-only) and there is no ``b_enc``, so ``--enc-init`` does not apply. The rows
stay unit-norm (the base's constraint, parallel gradient removed): the coefficients ⟨r, W_dec,j⟩ assume it. Folding
the trainer's input scale s: the selection does not depend on the scale and the coefficients are linear in it, so
b_dec / s alone makes the SAE act on raw activations (its codes are the trained units' / s); the rows stay unit-norm.

**SAELens** (``sae_lens.saes.matching_pursuit_sae``, architecture ``"matching_pursuit"``) holds the same model: tied
(its W_enc is W_dec.T), weights ``W_dec`` and ``b_dec`` only (its loader is strict: no other tensor may be in the
file), positive selection, and cfg fields ``max_iterations``, ``residual_threshold`` (an absolute residual norm) and
``stop_on_duplicate_support``. A saved folder writes ``max_iterations`` k, ``residual_threshold`` 0 and
``stop_on_duplicate_support`` false, under which SAELens takes the same k steps. ``--mp-residual`` > 0 is a relative
stop that SAELens cannot express: that folder's architecture is written as ``"matching_pursuit_relative"``, a name
SAELens refuses rather than one it would read with other codes. A SAELens folder loads when its cfg asks for those
same steps (``stop_on_duplicate_support`` false, ``residual_threshold`` 0): k = ``max_iterations`` (d_in when unset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.kernels import sparse_decode
from saelab.sae.base import SAE, mse

#: SAELens's architecture name; with --mp-residual > 0, the name written instead (SAELens refuses it)
SAELENS_ARCH, SAELENS_RELATIVE = "matching_pursuit", "matching_pursuit_relative"


def pursuit(xc: torch.Tensor, W: torch.Tensor, k: int, stop: float = 0.0):
    """k matching-pursuit steps of the centred rows ``xc`` [N, d] over the unit rows of ``W`` [d_sae, d]: (values
    [N, k], indices [N, k], final residual [N, d]); step t's coefficient and atom are column t (a repeated atom
    appears twice, a step that added nothing has value 0). ``stop`` τ > 0: a row takes no further step once its
    residual norm is under τ·‖xc‖. Differentiable in xc and W except through the choice of atoms."""
    r = xc
    floor = stop * xc.detach().norm(dim=-1) if stop > 0 else None
    vals, idxs = [], []
    for _ in range(k):
        with torch.no_grad():
            j = (r @ W.T).argmax(-1)
        d = W[j]
        c = (r * d).sum(-1).clamp_min(0)
        if floor is not None:
            live = r.detach().norm(dim=-1) >= floor
            if not bool(live.any()):  # every row has stopped: the rest of the steps add nothing
                vals += [torch.zeros_like(c)] * (k - len(vals))
                idxs += [torch.zeros_like(j)] * (k - len(idxs))
                break
            c = c * live
        r = r - c[:, None] * d
        vals.append(c)
        idxs.append(j)
    return torch.stack(vals, -1), torch.stack(idxs, -1), r


def merge_repeats(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values`` [N, k] with each atom's total in the first slot that names it and 0 in its repeats, so that the
    non-zero values count the latents that fire (L0, firing statistics)."""
    same = indices[:, :, None] == indices[:, None, :]
    first = same.float().argmax(-1)  # the first slot with the same atom (argmax returns the first maximum)
    return torch.zeros_like(values).scatter_add_(-1, first, values)


class MatchingPursuitSAE(SAE):
    arch = "mp"
    saelens_arch = SAELENS_ARCH
    saved_params = ("W_dec", "b_dec")

    def __init__(self, cfg):
        if cfg.enc_init is not None:
            raise SaelabError(f"--enc-init {cfg.enc_init} does not apply to --arch mp: its encoder is its decoder "
                              "(tied, W_enc = W_decᵀ); drop it")
        super().__init__(cfg)
        self.__dict__["_tied"] = True  # from here on an assignment of W_enc or b_enc is an error

    def __setattr__(self, name, value):
        if name in ("W_enc", "b_enc"):
            if "_tied" not in self.__dict__:  # the base init's encoder weights: this SAE has none
                return
            raise AttributeError(f"the mp SAE has no {name} of its own (its encoder is W_decᵀ): set W_dec")
        super().__setattr__(name, value)

    @property
    def W_enc(self) -> torch.Tensor:
        """The tied encoder, W_decᵀ [d_in, d_sae] (a view: read it, do not assign it)."""
        return self.W_dec.t()

    @classmethod
    def weight_shapes(cls, cfg):
        return {"W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}

    # ------------------------------------------------------------------ forward
    def centred(self, x) -> torch.Tensor:
        """x − b_dec (x alone where the SAE does not subtract b_dec) in the SAE's dtype, after the checks that
        ``pre_acts`` makes of x (width, device)."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, device=self.W_dec.device)
        self.check_input(x)
        if x.device != self.W_dec.device:
            raise SaelabError(f"the input is on {x.device} but this SAE is on {self.W_dec.device}: move one, "
                              f"e.g. sae.to('{x.device}') or x.to('{self.W_dec.device}')")
        if x.dtype != self.W_dec.dtype:
            x = x.to(self.W_dec.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_acts(self, x):
        raise SaelabError("the mp SAE has no pre-activations: its codes come from k pursuit steps over the residual; "
                          "call encode")

    def encode(self, x, grads=None):
        """Dense codes [..., d_sae] of x [..., d_in]: k pursuit steps per row (fewer under ``cfg.mp_residual``),
        each row's independent of the others."""
        xc = self.centred(x)
        rows = xc.reshape(-1, self.d_in)
        v, i, _ = pursuit(rows, self.W_dec, self.cfg.k, self.cfg.mp_residual)
        f = torch.zeros(len(rows), self.d_sae, dtype=v.dtype, device=v.device).scatter_add_(-1, i, v)
        return f.reshape(*xc.shape[:-1], self.d_sae)

    def decode(self, f):
        out = super().decode(f)
        return out if self.apply_b_dec_to_input else out - self.b_dec  # SAELens's: b_dec only where it centred x

    def loss(self, x, step=0, grads=None):
        xc = self.centred(x)
        v, i, r = pursuit(xc, self.W_dec, self.cfg.k)
        x_hat = xc - r + (self.b_dec if self.apply_b_dec_to_input else 0)  # = f W_dec + b_dec
        return self._out((merge_repeats(v.detach(), i), i), x_hat, mse=mse(x, x_hat), aux=self.aux_loss(r.detach()))

    def aux_loss(self, err: torch.Tensor) -> torch.Tensor | None:
        """The dead atoms' pursuit of the detached residual ``err``: the top k_aux by ⟨err, W_dec,j⟩ (ReLU)
        reconstruct it; None when nothing is dead (or --aux-coeff 0)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_coeff == 0:
            return None
        k_aux = self.cfg.k_aux or max(1, self.d_in // 2)
        dead_idx = dead.nonzero().squeeze(1)
        z = err @ self.W_dec[dead_idx].T
        vals, local = z.topk(min(k_aux, n_dead), dim=-1)
        err_hat = sparse_decode(F.relu(vals), dead_idx[local], self.W_dec)
        return self.cfg.aux_coeff * min(n_dead / k_aux, 1.0) * mse(err, err_hat)

    # ------------------------------------------------------------------ scale, save
    @torch.no_grad()
    def fold_input_scale(self, s, s_out=None):
        assert s_out is None or s_out == s, "an SAE reconstructs its input: one scale"
        self.b_dec /= s

    def saelens_cfg(self):
        cfg = {**super().saelens_cfg(), "max_iterations": self.cfg.k, "residual_threshold": 0.0,
               "stop_on_duplicate_support": False}
        if self.cfg.mp_residual > 0:
            cfg["architecture"] = SAELENS_RELATIVE
        return cfg

    @classmethod
    def saelens_k(cls, raw, path):  # its k is its steps; a pursuit that stops otherwise than saelab's is refused
        return saelens_steps(raw, path)


def saelens_steps(raw: dict, path) -> int:
    """k of a SAELens ``matching_pursuit`` cfg.json whose pursuit is saelab's (``max_iterations`` steps, d_in when
    unset); a one-line error for one that stops otherwise (on a repeated support, SAELens's default, or at an
    absolute residual norm), whose codes saelab's mp would not give."""
    dup, thr = raw.get("stop_on_duplicate_support", True), raw.get("residual_threshold", 1e-2)
    if dup or (thr or 0) > 0:
        raise SaelabError(f"{path}: this SAELens matching_pursuit SAE stops its pursuit early "
                          f"(stop_on_duplicate_support {dup}, residual_threshold {thr}); saelab's mp takes "
                          "max_iterations steps (or stops at a fraction of the input's norm, --mp-residual), so its "
                          "codes would differ: not supported")
    return int(raw.get("max_iterations") or raw["d_in"])
