"""ReLU SAE: f = ReLU(z); loss = ‖x − x̂‖² + λ Σᵢ fᵢ‖W_dec,i‖₂, λ warmed up over the first
``sparsity_warmup`` of the steps. λ is fixed by ``l1_coeff`` or, by default, adapted so the
mean L0 reaches ``k`` (architectures are compared at equal L0).

Training runs sparse (``SAE.sparse_codes``: the entries z > 0 only, decoded and differentiated through those entries)
whenever few enough latents fire; the dense path (``--kernel reference``, and the first steps, where about half of
them fire) is the reference the tests compare it with.

``--bias-adaptation`` trains by group bias adaptation instead (GBA: Chen, Sheen, Xiong, Wang and Yang 2025, "Taming
Polysemanticity in LLMs"): the loss is the reconstruction alone, and the encoder biases leave the gradient to a rule
that holds each latent's firing frequency at its group's target (TAF). The latents split into ``gba_groups``
contiguous groups; group g's target is p_g = p_0 · span^(−g/(G−1)), p_0 set so the targets sum to ``k`` over the
latents (L0 ≈ k, as the other architectures are compared). The rule, every ``gba_every`` steps, on the firing counts
of those steps: b ← b − rate · ‖W_enc[:, m]‖ · clip((freq − p)/p, −1, 1), so a latent firing too often lowers its bias,
one firing too rarely (a dead one at full rate) raises it, by a step in the units of its own pre-activations (their
spread over rows of norm √d_in), which follow its encoder's growth. The paper states the frequency targets per group and the bias-only
control; the proportional, clipped step and its rate are this implementation's choice (the paper's algorithm steps
by the neurons' pre-activation scale). Before the first step each bias is set so its latent fires at its target on a
sample of the store (the target quantile of its pre-activations), and the decoder rows are kept unit-norm, so the
pre-activations keep one scale for the rule's step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.sae.base import SAE, mse
from saelab.sae.control import SparsityController

#: the sample a GBA run's biases are set on before the first step (fewer when the store holds fewer)
GBA_INIT_ROWS = 4096


def gba_targets(d_sae: int, k: float, groups: int, span: float) -> torch.Tensor:
    """[d_sae]: each latent's target firing frequency, by contiguous group, geometric over ``span``, summing to k."""
    g = torch.arange(d_sae, dtype=torch.float64) * groups // d_sae
    shape = span ** (-g / max(1, groups - 1))
    return (shape * (k / shape.sum())).clamp(max=1.0).float()


class ReluSAE(SAE):
    arch = "relu"
    constrain_decoder = False  # the penalty weighs each latent by its decoder norm instead
    saelens_arch = "standard"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gba = bool(getattr(cfg, "bias_adaptation", False))
        if self.gba:
            self.constrain_decoder = True  # no penalty reads the norms; unit rows keep the pre-activations' scale
            self.b_enc.requires_grad_(False)  # the rule sets it, not the gradient (Adam skips it)
            self.register_buffer("gba_target", gba_targets(self.d_sae, cfg.k, cfg.gba_groups, cfg.gba_span))
            self.register_buffer("gba_fires", torch.zeros(self.d_sae, dtype=torch.long))
            self.register_buffer("gba_tokens", torch.zeros((), dtype=torch.long))
        else:
            self.control = SparsityController(cfg.l1_coeff, init=0.1, target=cfg.k)

    def activation(self, z, grads=None):
        return F.relu(z)

    def loss(self, x, step=0, grads=None, target=None):
        """``target``: what x̂ reconstructs (a transcoder's paired output; default x itself)."""
        y = x if target is None else target
        c = self.sparse_codes(x, 0.0)
        if self.gba:  # the reconstruction alone: the biases hold the sparsity
            if c is not None:
                x_hat = c.decode(self.W_dec, self.b_dec)
                return self._out(c, x_hat, mse=mse(y, x_hat))
            f = F.relu(self.pre_acts(x))
            x_hat = self.decode(f)
            return self._out(f, x_hat, mse=mse(y, x_hat))
        coeff = self.control.coeff * self.sparsity_warmup(step)
        if c is not None:  # the entries z > 0 are the codes (ReLU is the identity there)
            x_hat = c.decode(self.W_dec, self.b_dec)
            l1 = (c.values * self.W_dec.norm(dim=1)[c.cols]).sum() / c.n_rows
            return self._out(c, x_hat, mse=mse(y, x_hat), l1=coeff * l1)
        f = F.relu(self.pre_acts(x))
        x_hat = self.decode(f)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self._out(f, x_hat, mse=mse(y, x_hat), l1=coeff * l1)

    # ------------------------------------------------------------------ group bias adaptation
    @classmethod
    def rows_for_init(cls, cfg) -> int:
        return GBA_INIT_ROWS if getattr(cfg, "bias_adaptation", False) else 0

    @torch.no_grad()
    def init_from_rows(self, x: torch.Tensor) -> None:
        """GBA: each bias at minus its latent's (1 − target) quantile of the sample's bias-free pre-activations."""
        if not self.gba:
            return
        z = (x - self.b_dec) @ self.W_enc  # [n, d_sae], before the bias
        order = z.sort(dim=0).values
        at = ((1 - self.gba_target) * (len(z) - 1)).round().long().clamp(0, len(z) - 1)
        self.b_enc.copy_(-order.gather(0, at[None])[0])

    @torch.no_grad()
    def after_step(self, out: dict, step: int, reduce=None) -> None:
        super().after_step(out, step, reduce)
        if not self.gba:
            return
        counts, n = self.fire_counts(out)
        if reduce is not None:  # every rank: the global batch's counts
            counts, n = (reduce.mean(counts.double()) * reduce.world).round().long(), n * reduce.world
        self.gba_fires += counts
        self.gba_tokens += n
        if (step + 1) % self.cfg.gba_every == 0:
            freq = self.gba_fires.double() / self.gba_tokens.clamp_min(1)
            err = ((freq - self.gba_target) / self.gba_target).clamp(-1, 1)
            # in each latent's own units: its pre-activations on rows of norm √d_in spread as ‖W_enc[:, m]‖
            self.b_enc -= (self.cfg.gba_rate * err).to(self.b_enc) * self.W_enc.norm(dim=0)
            self.gba_fires.zero_()
            self.gba_tokens.zero_()
