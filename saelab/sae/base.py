"""The shared SAE base: parameters, encode/decode, decoder constraint, dead latents, save/load.

Every architecture is one file that subclasses ``SAE``, sets ``arch`` (its registry name) and
implements ``activation(z)`` (inference codes from pre-activations) and ``loss(x, step)``.

Shapes (SAELens layout): ``x [B, d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; pre-activation ``z = (x − b_dec) W_enc + b_enc``;
reconstruction ``x̂ = f W_dec + b_dec``.

Folders: ``cfg.json`` (SAELens fields + our full config under ``"saelab"``) and
``sae_weights.safetensors`` (W_enc, b_enc, W_dec, b_dec, and ``threshold`` where the
architecture has one) — SAELens reads them; ``SAE.load`` also reads SAELens's own folders.
"""

from __future__ import annotations

import contextvars
import json
import os
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from saelab.config import ARCHS, TRANSCODERS, SAEConfig
from saelab.device import pick_device
from saelab.errors import SaelabError, first_line
from saelab.fs import atomic_write_bytes, atomic_write_text, check_regular, fsync_dir, write_error
from saelab.hooks import hook_layer
from saelab.kernels import sparse_decode
from saelab.kernels.dispatch import resolve_kernel
from saelab.kernels.sparse_codes import SparseCodes, batch_top, entries, floor_encode
from saelab.layout import CFG_FILE, HUB_PREFIX, WEIGHTS_FILE, hub_spec, read_sae_cfg

SAVED_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
#: a batch-wide selection (batch_sparse_codes) reads the entries above this fraction of the last batches' cut (the cut
#: moves little between steps), halving the floor up to BATCH_TRIES times while fewer than the n it keeps pass
BATCH_FLOOR = 0.8
BATCH_TRIES = 3
#: set while SAE.from_weights builds an SAE whose weights come next: W_enc and W_dec start uninitialised
_NO_INIT = contextvars.ContextVar("saelab_sae_no_init", default=False)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, mean over the batch."""
    return (x - x_hat).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Sparse autoencoder base. Subclasses register themselves by their ``arch`` name."""

    registry: dict[str, type["SAE"]] = {}
    arch = ""
    #: unit-norm decoder rows, with the gradient component parallel to each row removed
    constrain_decoder = True
    #: SAELens architecture name written to cfg.json (None: not loadable as-is by SAELens)
    saelens_arch: str | None = None
    #: trains on stored gradients (the store must be harvested --with-grads)
    needs_grads = False
    #: init W_enc = enc_init · W_decᵀ when cfg.enc_init is None (the TopK family overrides it: a smaller encoder
    #: lets TopK's selection leave random projections sooner; docs: explanations/encoder init)
    enc_init = 1.0
    #: names in the weights file of parameters that the file calls otherwise (gated: b_enc is SAELens's b_gate)
    file_names: dict[str, str] = {}
    #: per-latent vectors [d_sae] beyond SAVED_PARAMS that every weights file of the architecture holds
    latent_weights: tuple[str, ...] = ()
    #: the matrices and biases every weights file holds (mp, whose encoder is its decoder: W_dec and b_dec only)
    saved_params: tuple[str, ...] = SAVED_PARAMS
    #: loaders of SAEs named by a spec instead of a folder, by prefix (``saelab.hub`` registers ``hf://``): the
    #: network stays a layer above the SAE, which reads local files only
    remote_loaders: dict = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("arch"):  # a class that names its architecture (not one that inherits the name)
            SAE.registry[cls.arch] = cls

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.d_in, self.d_sae = d_in, d_sae
        if _NO_INIT.get():  # SAE.from_weights: the weights replace these (no pages touched, no time spent)
            self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
            self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        else:
            w = torch.randn(d_sae, d_in)
            w = w / w.norm(dim=1, keepdim=True)
            self.W_dec = nn.Parameter(w)
            enc_init = self.enc_init if cfg.enc_init is None else cfg.enc_init
            self.W_enc = nn.Parameter(w.t() * enc_init)  # init: W_enc = enc_init · W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.apply_b_dec_to_input = True
        # tokens since each latent last fired (training statistics; kept in checkpoints)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.dead_after = cfg.dead_tokens  # the trainer caps it at the store's size
        self.total_steps = 1  # the trainer sets it (schedules that depend on the run length)
        self.kernel = "auto"  # TopK-family encode path in training (saelab.kernels); the trainer sets it
        self.control = None  # target-L0 controller (relu, jumprelu set one), updated after each step

    # ------------------------------------------------------------------ construction
    @staticmethod
    def create(arch: str, **kw) -> "SAE":
        """``SAE.create("topk", d_in=512, d_sae=8192, k=32)`` (``width=`` also works)."""
        if "d_sae" in kw:
            kw["width"] = kw.pop("d_sae")
        if arch not in SAE.registry:
            raise SaelabError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS + TRANSCODERS)}")
        return SAE.registry[arch](SAEConfig(arch=arch, **kw))

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        """A SaelabError (not a raw matmul error) when x's last dimension is not d_in."""
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            got = "a 0-d tensor" if x.ndim == 0 else f"last dimension {x.shape[-1]} (shape {list(x.shape)})"
            hook = f"hook {self.cfg.hook_name}" if self.cfg.hook_name else "its hook"
            if x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.d_in:  # hook_z's [..., n_heads, d_head]
                raise SaelabError(f"this SAE reads {hook} with d_in {self.d_in} = heads × d_head, but the input has "
                                  f"shape {list(x.shape)}: flatten the heads, x.flatten(-2)")
            raise SaelabError(f"this SAE reads {hook} with d_in {self.d_in}, but the input has {got}: "
                              f"pass activations of that hook, shaped [..., {self.d_in}]")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # a numpy array or nested list: as a tensor on the SAE's device
            x = torch.as_tensor(x, device=self.W_enc.device)
        self.check_input(x)
        if x.device != self.W_enc.device:  # else a raw "expected all tensors on the same device" from the matmul
            raise SaelabError(f"the input is on {x.device} but this SAE is on {self.W_enc.device}: move one, "
                              f"e.g. sae.to('{x.device}') or x.to('{self.W_enc.device}')")
        if x.dtype != self.W_enc.dtype:  # e.g. float64 from numpy, half from a half model: the SAE's dtype
            x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, z: torch.Tensor, grads: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, grads: torch.Tensor | None = None) -> torch.Tensor:
        """Dense codes f [..., d_sae] of x [..., d_in] (rows, or [batch, pos] from a hook) as used at
        inference (independent of the rest of the batch)."""
        return self.activation(self.pre_acts(x), grads)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """x_hat [..., d_in] of codes f [..., d_sae]; f in another dtype (float64 from numpy, half)
        is cast to the SAE's (a numpy array or list is taken as a tensor), a wrong width is a SaelabError."""
        if not isinstance(f, torch.Tensor):
            f = torch.as_tensor(f, device=self.W_dec.device)
        if f.ndim == 0 or f.shape[-1] != self.d_sae:
            got = "a 0-d tensor" if f.ndim == 0 else f"last dimension {f.shape[-1]} (shape {list(f.shape)})"
            raise SaelabError(f"this SAE has d_sae {self.d_sae} latents, but the codes passed to decode have {got}: "
                              f"pass codes from sae.encode, shaped [..., {self.d_sae}]")
        if f.dtype != self.W_dec.dtype:
            f = f.to(self.W_dec.dtype)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def sparse_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The centred rows x − b_dec (x itself where b_dec is not subtracted) a sparse training step encodes, or None
        where the step runs dense: on the reference kernel (``--kernel reference``, the plain path the fast ones are
        tested against) and for inputs other than [B, d_in] rows."""
        if resolve_kernel(self.kernel, x.device) == "reference" or x.ndim != 2:
            return None
        self.check_input(x)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def sparse_codes(self, x: torch.Tensor, floor) -> SparseCodes | None:
        """The training codes' candidates for a sparse step: the pre-activation entries above ``floor`` ([d_sae] or
        a number) as SparseCodes (``saelab.kernels.sparse_codes``: values z, the backward through them alone), or
        None where the step runs dense (``sparse_input``, or too many entries pass)."""
        xc = self.sparse_input(x)
        return None if xc is None else floor_encode(xc, self.W_enc, self.b_enc, floor)

    def batch_sparse_codes(self, x: torch.Tensor, n: int, guess: float) -> SparseCodes | None:
        """The n largest ReLU(z) of the batch's whole [B, d_sae] pre-activation (BatchTopK's and Mutual Choice's
        training rule) as SparseCodes: the entries above a floor under the expected cut (``BATCH_FLOOR`` × ``guess``,
        the last batches' cut) by ``floor_encode``, the n largest of them kept (``batch_top``); the floor halves while
        fewer than n pass. None where the step runs dense: no positive guess yet (the first step), ``sparse_input``'s
        cases, too many entries above the floor, or no floor found in ``BATCH_TRIES`` halvings."""
        xc = self.sparse_input(x) if guess > 0 else None
        if xc is None:
            return None
        floor = BATCH_FLOOR * guess
        for _ in range(BATCH_TRIES):
            c = floor_encode(xc, self.W_enc, self.b_enc, floor, grad=False)
            if c is None:
                return None
            top = batch_top(c, n)
            if top is not None:  # the kept entries alone take part in the backward
                return top.with_values(entries(xc, self.W_enc, self.b_enc, top.rows, top.cols, top.values))
            floor /= 2
        return None

    def loss(self, x: torch.Tensor, step: int = 0, grads: torch.Tensor | None = None) -> dict:
        """Training loss: ``{"loss": total to backprop, <terms>: 0-d tensors, "x_hat", and the codes:
        "f" (dense [B, d_sae]), from the fused TopK path "codes" = (values, indices), or from the ReLU family's
        sparse paths "sparse" = SparseCodes}`` (``code_stats`` reads any of them)."""
        raise NotImplementedError

    def _out(self, codes, x_hat, **terms) -> dict:
        """The loss dict: total + the non-None terms, x_hat, and the codes ("f" when dense, "codes" when a
        (values, indices) pair, "sparse" when SparseCodes, detached)."""
        terms = {k: v for k, v in terms.items() if v is not None}
        if isinstance(codes, SparseCodes):
            return {"loss": sum(terms.values()), **terms, "sparse": codes.detach(), "x_hat": x_hat}
        key = "codes" if isinstance(codes, tuple) else "f"
        return {"loss": sum(terms.values()), **terms, key: codes, "x_hat": x_hat}

    def dense_codes(self, out: dict) -> torch.Tensor:
        """The loss dict's codes as a dense [B, d_sae] tensor, whichever form they take (for inspection and tests;
        the training paths never form it)."""
        if "f" in out:
            return out["f"]
        if "sparse" in out:
            return out["sparse"].dense(self.d_sae)
        v, i = out["codes"]
        return torch.zeros(*v.shape[:-1], self.d_sae, dtype=v.dtype, device=v.device).scatter_add(-1, i, v)

    def code_stats(self, out: dict) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(fired [d_sae] bool, rows, mean active latents per row as a 0-d float tensor) of a loss dict's codes,
        whichever form they take."""
        if "f" in out:  # [B, d_sae], or a CLT's [B, L, d_sae] (its counters are per layer)
            nz = out["f"] != 0
            return nz.any(0), nz.shape[0], nz.sum(-1).float().mean()
        if "sparse" in out:
            c = out["sparse"]
            return c.fired(self.d_sae), c.n_rows, c.active().sum().float() / max(1, c.n_rows)
        v, i = out["codes"]
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=v.device)
        fired[i[v != 0]] = True
        return fired, v.shape[0], (v != 0).sum(-1).float().mean()

    def fire_counts(self, out: dict) -> tuple[torch.Tensor, int]:
        """([d_sae] long: the rows each latent fired on, rows) of a loss dict's codes, whichever form they take."""
        if "f" in out:
            nz = out["f"] != 0
            return nz.reshape(-1, self.d_sae).sum(0), nz.shape[0]
        if "sparse" in out:
            c = out["sparse"]
            cols = c.cols[c.active()]
            return torch.bincount(cols, minlength=self.d_sae), c.n_rows
        v, i = out["codes"]
        return torch.bincount(i[v != 0], minlength=self.d_sae), v.shape[0]

    @classmethod
    def saelens_k(cls, raw: dict, path: pathlib.Path) -> int:
        """The k of a SAELens cfg.json read as this architecture (its own k, or the architecture's kwargs')."""
        return raw.get("k") or (raw.get("architecture_kwargs") or {}).get("k") or 1

    # ------------------------------------------------------------------ training hooks
    @classmethod
    def rows_for_init(cls, cfg: SAEConfig) -> int:
        """Training rows the architecture reads before its first step (``init_from_rows``); 0: none."""
        return 0

    #: where a store holds fewer training rows than ``rows_for_init``: the fix a one-line error names, or None when
    #: the architecture takes the rows there are
    init_rows_fix: str | None = None

    def init_from_rows(self, x: torch.Tensor) -> None:
        """Called once before training with ``rows_for_init`` seeded training rows, in the trainer's scale."""

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: multiplier of the trainer's LR} for parameters that step at another rate (none: all at
        the LR)."""
        return {}

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after

    def aux_k_loss(self, x, x_hat, signed: bool = False, target=None, latents=None) -> torch.Tensor | None:
        """Reconstruct the detached residual error (of ``target``, default x) from the top k_aux dead latents
        (``latents``: another mask of the latents it reads, e.g. the dead and the underused) (no b_dec), scaled by
        min(n_dead / k_aux, 1) and the aux coefficient. None when there are none. Only their pre-activations are
        computed."""
        dead = self.dead_mask() if latents is None else latents
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_coeff == 0:
            return None
        k_aux = self.cfg.k_aux or max(1, self.cfg.output_dim // 2)  # of the space x_hat lives in
        dead_idx = dead.nonzero().squeeze(1)
        xc = x - self.b_dec if self.apply_b_dec_to_input else x
        z = xc @ self.W_enc[:, dead_idx] + self.b_enc[dead_idx]
        kk = min(k_aux, n_dead)
        local = (z.abs() if signed else z).topk(kk, dim=-1).indices
        vals = z.gather(-1, local)
        if not signed:
            vals = F.relu(vals)
        err = ((x if target is None else target) - x_hat).detach()
        err_hat = sparse_decode(vals, dead_idx[local], self.W_dec)
        return self.cfg.aux_coeff * min(n_dead / k_aux, 1.0) * mse(err, err_hat)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        if self.constrain_decoder and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            g = self.W_dec.grad
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_step(self, out: dict, step: int, reduce=None) -> None:
        """Called by the trainer after each optimizer step: decoder norm, firing counters.

        ``reduce`` (``saelab.distributed.Reduce``) combines the statistics of all ranks under
        DDP (firing = fired on any rank, tokens = the global batch, L0 = the global mean), so
        every rank keeps identical counters; None in a single process."""
        if self.constrain_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        fired, n, l0 = self.code_stats(out)
        if reduce is not None:
            fired, n = reduce.any(fired), n * reduce.world
        self.tokens_since_fired += n
        self.tokens_since_fired[fired] = 0
        if self.control is not None and self.sparsity_warmup(step) >= 1.0:
            self.control.update(reduce.mean(l0) if reduce is not None else l0)

    def sparsity_warmup(self, step: int) -> float:
        n = max(1, int(self.cfg.sparsity_warmup * self.total_steps))
        return min(1.0, (step + 1) / n)

    # ------------------------------------------------------------------ scale folding
    def add_skip(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """The output of input x whose sparse part is x_hat: x_hat itself (a skip transcoder adds its linear path)."""
        return x_hat

    @torch.no_grad()
    def fold_input_scale(self, s: float, s_out: float | None = None) -> None:
        """The SAE was trained on s·x; make it act on raw x. Codes are unchanged, so thresholds
        (JumpReLU, BatchTopK) stay, and g-SAE scores too (W_dec/s against raw grads s·∇). ``s_out``: the scale of
        a transcoder's targets (an SAE's targets are its inputs: s)."""
        assert s_out is None or s_out == s, "an SAE reconstructs its input: one scale"
        self.W_enc *= s
        self.b_dec /= s
        self.W_dec /= s

    # ------------------------------------------------------------------ save / load
    def extra_weights(self) -> dict[str, torch.Tensor]:
        """Weights beyond SAVED_PARAMS that a saved SAE needs (e.g. JumpReLU's threshold)."""
        return {}

    def load_extra_weights(self, w: dict[str, torch.Tensor]) -> None:
        pass

    def saelens_cfg(self) -> dict:
        c = self.cfg
        meta = {"model_name": c.model_name, "hook_name": c.hook_name, "hook_head_index": None,
                "prepend_bos": True, "dataset_path": None, "context_size": None,
                "sae_lens_training_version": None}
        cfg = {
            "architecture": self.saelens_arch or self.arch,
            "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": meta,
            # flat copies for older readers
            "model_name": c.model_name, "hook_name": c.hook_name, "hook_layer": hook_layer(c.hook_name),
            "hook_head_index": None, "prepend_bos": True, "context_size": None, "dataset_path": None,
            "finetuning_scaling_factor": False, "sae_lens_training_version": None,
        }
        return cfg

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write cfg.json + sae_weights.safetensors (temp → fsync → rename each)."""
        from safetensors.torch import save

        path = pathlib.Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        weights = {self.file_names.get(n, n): getattr(self, n).detach().float().contiguous().cpu()
                   for n in self.saved_params}
        weights.update({k: v.detach().float().contiguous().cpu() for k, v in self.extra_weights().items()})
        try:  # serialised in memory, written by Python: a full disk is a one-line error, the old file kept
            atomic_write_bytes(path / WEIGHTS_FILE, save(weights))
        except OSError as e:
            raise write_error(path / WEIGHTS_FILE, e) from None
        cfg = {**self.saelens_cfg(), "saelab": {**self.cfg.to_dict(), "d_sae": self.d_sae}}
        atomic_write_text(path / CFG_FILE, json.dumps(cfg, indent=2) + "\n")
        fsync_dir(path)
        return path

    @staticmethod
    def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> "SAE":
        """Load a saelab SAE folder, or a SAELens one (standard, topk, jumprelu, gated). A hub spec
        (``"hf://ORG/REPO/SUBFOLDER"``) goes to the loader ``saelab.hub`` registers (``saelab.load_sae`` and
        ``from saelab import SAE`` import it); ``saelab fetch`` makes a folder of it instead, which analyze can
        write into."""
        from safetensors.torch import load_file

        spec = hub_spec(path)
        if spec:
            loader = SAE.remote_loaders.get(HUB_PREFIX)
            if loader is None:
                raise SaelabError(f"{spec} is a hub SAE: load it with saelab.load_sae({spec!r}) (or import saelab.hub "
                                  "first), or make a folder of it with saelab fetch")
            return loader(spec, device)
        path = pathlib.Path(path).expanduser()
        raw = read_sae_cfg(path)  # a group folder, a missing folder or a bad cfg.json: a one-line error
        device = pick_device(device)  # "cuda" without CUDA, or "gpu": a one-line error, not a loader traceback
        check_regular(path / WEIGHTS_FILE)
        try:
            w = load_file(str(path / WEIGHTS_FILE), device=str(device))
        except Exception as e:  # safetensors' own error for a truncated, empty or foreign file
            raise SaelabError(f"{path / WEIGHTS_FILE} is not a readable safetensors file ({first_line(e)}); re-save, "
                              "re-train or re-fetch the SAE") from None
        if "saelab" in raw:
            try:
                cfg = SAEConfig.from_dict({k: v for k, v in raw["saelab"].items() if k != "d_sae"}).validate()
            except (TypeError, ValueError, KeyError, SaelabError) as e:  # a setting off its rules names the file
                raise SaelabError(f"{path / CFG_FILE}: its saelab settings do not load ({e}); "
                                  "re-save the SAE") from None
        else:
            cfg = _cfg_from_saelens(raw, path)
        sae = SAE.from_weights(cfg, w, str(path / WEIGHTS_FILE), device,
                               apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)))
        _check_stated_sizes(raw, sae, path)
        return sae

    def one_layer(self, what: str) -> "SAE":
        """This SAE, for ``what`` (a command that reads one layer's SAE or transcoder); a cross-layer transcoder
        refuses it in one line."""
        return self

    def check_finite(self, where) -> "SAE":
        """This SAE, once its weights are finite; a one-line error naming ``where`` otherwise (a diverged training
        run's weights: no metric or feature database of them means anything)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
            raise SaelabError(f"{where}: the SAE's weights hold NaN or inf (its training diverged): train it again, "
                              "e.g. with a lower --lr")
        return self

    @staticmethod
    def blank(cfg: SAEConfig) -> "SAE":
        """An SAE of ``cfg`` whose W_enc and W_dec are allocated but not initialised (no random init: no time
        spent, no pages touched, no random numbers drawn), for weights that are assigned or loaded next."""
        token = _NO_INIT.set(True)
        try:
            return SAE.registry[cfg.arch](cfg)
        finally:
            _NO_INIT.reset(token)

    @classmethod
    def weight_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a weights file of this architecture holds (by attribute name) and its shape under cfg."""
        return {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.output_dim),
                "b_dec": (cfg.output_dim,), **{n: (cfg.d_sae,) for n in cls.latent_weights}}

    @staticmethod
    def from_weights(cfg: SAEConfig, w: dict[str, torch.Tensor], where: str = "the weights",
                     device: str | torch.device | None = None, apply_b_dec_to_input: bool = True) -> "SAE":
        """An SAE of ``cfg`` holding the weights ``w`` (W_enc, b_enc, W_dec, b_dec, and what the architecture's
        ``load_extra_weights`` reads, e.g. JumpReLU's threshold), on ``device`` (default: w's). The tensors become
        the parameters (as float32), with no random init first: that init would cost as much time and memory
        as the weights themselves, so loading a wide SAE needs its size once, not twice. A missing tensor or a
        shape that does not fit ``cfg`` is a one-line SaelabError naming ``where``."""
        cls = SAE.registry[cfg.arch]
        w = {next((a for a, f in cls.file_names.items() if f == n), n): t for n, t in w.items()}  # file → attribute
        want = cls.weight_shapes(cfg)
        missing = [cls.file_names.get(n, n) for n in want if n not in w]
        if missing:  # e.g. a jumprelu without its threshold: the init's threshold would give other codes, silently
            raise SaelabError(f"{where} lacks {', '.join(missing)}: not a {cfg.arch} SAE weights file; re-save, "
                              "re-train or re-fetch the SAE")
        for n, shape in want.items():
            if tuple(w[n].shape) != shape:
                sizes = f"d_in {cfg.d_in}" + (f", d_out {cfg.d_out}" if cfg.d_out else "") + f" and d_sae {cfg.d_sae}"
                raise SaelabError(f"{where}: {cls.file_names.get(n, n)} has shape {tuple(w[n].shape)} but {sizes} "
                                  f"need {shape}; the files do not belong together")
        device = w["W_dec"].device if device is None else torch.device(device)
        sae = SAE.blank(cfg)
        with torch.no_grad():
            for n in cls.saved_params:
                getattr(sae, n).data = w[n].to(device=device, dtype=torch.float32).contiguous()
        sae = sae.to(device)  # the rest (biases of other architectures, buffers) is small
        sae.apply_b_dec_to_input = apply_b_dec_to_input and cfg.arch not in TRANSCODERS  # b_dec: the output's
        sae.load_extra_weights(w)
        return sae


def _check_stated_sizes(raw: dict, sae: SAE, path: pathlib.Path) -> None:
    """Every d_in and d_sae that cfg.json states (top level, and its saelab block) is the weights' (from_weights
    checked the config they build against every tensor): readers of cfg.json alone, e.g. a feature database's
    width, then agree with the SAE that loads."""
    block = raw.get("saelab") if isinstance(raw.get("saelab"), dict) else {}
    for where, fields in (("", raw), ("saelab.", block)):
        for name, got in (("d_in", sae.d_in), ("d_sae", sae.d_sae), ("d_out", sae.cfg.d_out or None)):
            if got is None:  # an SAE: no d_out to agree with
                continue
            said = fields.get(name)
            if said is not None and (isinstance(said, bool) or said != got):
                raise SaelabError(f"{path / CFG_FILE}: {where}{name} is {said!r} but the weights in {WEIGHTS_FILE} "
                                  f"give {name} {got} (W_enc {tuple(sae.W_enc.shape)}); the files do not belong "
                                  "together: re-save or re-fetch the SAE")


def _cfg_from_saelens(raw: dict, path: pathlib.Path) -> SAEConfig:
    arch = raw.get("architecture", "standard")
    names = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
             "transcoder": "transcoder", "skip_transcoder": "skip-transcoder",
             "jumprelu_transcoder": "transcoder", "jumprelu_skip_transcoder": "skip-transcoder",
             "matching_pursuit": "mp"}
    if arch not in names:
        raise SaelabError(f"{path}: SAELens architecture {arch!r} is not supported "
                          f"(supported: {', '.join(names)})")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SaelabError(f"{path}: SAELens normalize_activations={raw['normalize_activations']!r} is not "
                          "supported; fold the normalisation into the weights first")
    meta = raw.get("metadata") or {}
    k = SAE.registry[names[arch]].saelens_k(raw, path)
    try:  # older SAELens configs may give the width only as d_in × expansion_factor
        d_in = int(raw["d_in"])
        d_sae = int(raw.get("d_sae") or d_in * int(raw["expansion_factor"]))
    except (KeyError, TypeError, ValueError):
        raise SaelabError(f"{path / 'cfg.json'} gives no usable d_in and d_sae (or expansion_factor): "
                          "not an SAE config saelab can read") from None
    coder = {}
    if names[arch] in TRANSCODERS:  # SAELens's transcoders: ReLU, or JumpReLU by name; d_out its own field
        try:
            coder = {"d_out": int(raw["d_out"]), "act_fn": "jumprelu" if arch.startswith("jumprelu") else "relu",
                     "hook_name_out": meta.get("hook_name_out") or raw.get("hook_name_out") or ""}
        except (KeyError, TypeError, ValueError):
            raise SaelabError(f"{path / 'cfg.json'} is a SAELens {arch} without a usable d_out: not a transcoder "
                              "config saelab can read") from None
    return SAEConfig(arch=names[arch], d_in=d_in, width=d_sae, k=int(min(k, d_sae - 1)),
                     hook_name=meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "",
                     model_name=meta.get("model_name") or raw.get("model_name") or "", **coder)

