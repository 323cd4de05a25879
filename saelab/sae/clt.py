"""Cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit Tracing"): an encoder at every layer's MLP input
and decoders from each layer to its own and every later layer's MLP output, trained jointly.

Layers l = 0 … L−1 are the pairs of a RUN folder in layer order (``cfg.clt_pairs``, "IN_HOOK:OUT_HOOK"). Each layer
reads its own input: f_l = σ(x_l W_enc[l] + b_enc[l]), and each output is the sum of what the layers up to it
write: ŷ_m = Σ_{l ≤ m} f_l W_dec[l, :, m] + b_dec[m]. The loss is Σ_m ‖y_m − ŷ_m‖² (each the mean over the batch of
the sum over features) plus the activation's sparsity term. W_dec is held as one [L, d_sae, L, d_out] tensor with
the entries l > m (a layer writing to an earlier one) masked to zero in every forward, so they never learn.

σ is ``cfg.act_fn`` (``CrossLayerTranscoder(cfg)`` builds its class, as the transcoders do):

- ``topk`` (``TopKCLT``): k active latents per layer, on the fused sparse encode; no sparsity term.
- ``relu`` (``ReluCLT``): f = ReLU(z); λ Σ_l Σ_i f_{l,i} ‖W_dec[l, i]‖, the norm of latent i's decoders to every
  layer it writes, concatenated (a latent cannot buy sparsity by spreading its output over more layers; the
  ReLU SAE's decoder-weighted L1, over a CLT's decoders).
- ``jumprelu`` (``JumpReluCLT``): f = z·H(z − θ_l), θ [L, d_sae] per layer and latent; λ·Σ_l L0_l, with the JumpReLU
  SAE's straight-through estimators (rectangle kernel of width --bandwidth) for θ (Ameisen et al. train their
  CLTs with a JumpReLU).

For relu and jumprelu, λ is --l1-coeff / --l0-coeff or, by default, adapted so the mean L0 per layer reaches --k
(as the SAEs of those activations do), so CLTs of every activation compare at equal L0. Their codes are dense
[B, d_sae] tensors per layer, TopK's (values, indices) pairs; ``decode_layer`` reads both.

Inputs and targets [B, L, d] (the layers stacked). Each layer's inputs and targets are scaled by buffers set
from a sample (mean norm √d, ``init_from_sample``) while training, and folded into the weights when the run ends
(``fold_input_scale``), as the trainer folds an SAE's one scale, so a saved CLT maps raw inputs to raw outputs.
"""

from __future__ import annotations

import torch
from torch import nn

import math

import torch.nn.functional as F

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.kernels import sparse_decode, topk_encode
from saelab.kernels.reference import select
from saelab.sae.base import _NO_INIT, SAE
from saelab.sae.control import SparsityController
from saelab.sae.family import ByActivation
from saelab.sae.jumprelu import jumprelu, step_fn
from saelab.sae.topk import scatter


def as_pairs(code) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's code as (values, indices) [B, n]: TopK's as it is; dense codes (relu, jumprelu) by their n non-zero
    entries, n the most any row has, so a code kept across a forward holds what fired, not [B, d_sae]."""
    if isinstance(code, tuple):
        return code
    n = max(1, int((code != 0).sum(-1).max()) if code.numel() else 1)
    v, i = code.abs().topk(n, dim=-1)
    return code.gather(-1, i), i


def decode_layer(code, W: torch.Tensor) -> torch.Tensor:
    """What one layer's code writes through W [d_sae, d]: ``code`` is TopK's (values, indices) pair, or dense [B, d_sae]
    codes (relu, jumprelu)."""
    return sparse_decode(*code, W) if isinstance(code, tuple) else code @ W


class CrossLayerTranscoder(ByActivation, SAE):
    """The architecture's name; ``CrossLayerTranscoder(cfg)`` is the class of cfg.act_fn."""

    arch = "clt"
    constrain_decoder = False
    enc_init = 0.3
    #: cfg.act_fn → the CLT over that activation
    by_activation: dict[str, type] = {}

    def __init__(self, cfg: SAEConfig):
        nn.Module.__init__(self)  # not SAE's parameters: every weight has a layer axis
        self.cfg = cfg.validate()
        L, d_in, d_out, d_sae = cfg.n_layers, cfg.d_in, cfg.output_dim, cfg.d_sae
        self.n_layers, self.d_in, self.d_out, self.d_sae = L, d_in, d_out, d_sae
        mask = torch.ones(L, L).triu()  # [source l, target m]: l ≤ m
        self.register_buffer("mask", mask[:, None, :, None].clone())
        if _NO_INIT.get():
            self.W_enc = nn.Parameter(torch.empty(L, d_in, d_sae))
            self.W_dec = nn.Parameter(torch.empty(L, d_sae, L, d_out))
        else:
            e = torch.randn(L, d_in, d_sae)
            enc_init = self.enc_init if cfg.enc_init is None else cfg.enc_init
            self.W_enc = nn.Parameter(e / e.norm(dim=1, keepdim=True) * enc_init)
            w = torch.randn(L, d_sae, L, d_out)
            w = w / w.norm(dim=-1, keepdim=True) / mask.sum(1).sqrt()[:, None, None, None]  # rows of ‖·‖ 1/√targets
            self.W_dec = nn.Parameter(w * self.mask)
        self.b_enc = nn.Parameter(torch.zeros(L, d_sae))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out))
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
        self.apply_b_dec_to_input = False
        self.register_buffer("tokens_since_fired", torch.zeros(L, d_sae, dtype=torch.long))
        self.dead_after, self.total_steps, self.kernel, self.control = cfg.dead_tokens, 1, "auto", None

    @classmethod
    def weight_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        L = cfg.n_layers
        return {"W_enc": (L, cfg.d_in, cfg.d_sae), "b_enc": (L, cfg.d_sae), "W_dec": (L, cfg.d_sae, L, cfg.output_dim),
                "b_dec": (L, cfg.output_dim), "in_scale": (L,), "out_scale": (L,),
                **{n: (L, cfg.d_sae) for n in cls.concrete(cfg).latent_weights}}

    def one_layer(self, what: str):
        raise SaelabError(f"{what} reads one layer's SAE or transcoder, and this is a cross-layer transcoder: train "
                          "per-layer ones (--arch transcoder) for it; a clt is evaluated (saelab eval), traced (saelab attribute) "
                          "and saved")

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or tuple(x.shape[-2:]) != (self.n_layers, self.d_in):
            raise SaelabError(f"this cross-layer transcoder reads {self.n_layers} layers of d_in {self.d_in}, stacked as "
                              f"[..., {self.n_layers}, {self.d_in}]; the input has shape {list(x.shape)}")

    # ------------------------------------------------------------------------------------------ forward
    def codes(self, x: torch.Tensor, kernel: str | None = None) -> list:
        """Each layer's code (``layer_codes``) of inputs x [B, L, d_in] (in the trained units: scaled)."""
        self.check_input(x)
        return [self.layer_codes(x[:, l], l, kernel) for l in range(self.n_layers)]

    def layer_pre_acts(self, x: torch.Tensor, l: int) -> torch.Tensor:
        """Layer l's pre-activations z [B, d_sae] of its inputs x [B, d_in] (scaled)."""
        return x.to(self.W_enc.dtype) @ self.W_enc[l] + self.b_enc[l]

    def layer_activation(self, z: torch.Tensor, l: int) -> torch.Tensor:
        """Layer l's dense codes [B, d_sae] of its pre-activations z (inference: no batch dependence)."""
        raise NotImplementedError

    def layer_codes(self, x: torch.Tensor, l: int, kernel: str | None = None):
        """Layer l's code of its inputs x [B, d_in] (scaled): it reads its own input only (``decode_layer`` reads it)."""
        return self.layer_activation(self.layer_pre_acts(x, l), l)

    def train_codes(self, x: torch.Tensor, step: int) -> tuple[list, dict]:
        """Every layer's codes of scaled inputs x [B, L, d_in] in training, and the sparsity terms of the loss."""
        return self.codes(x), {}

    def decode_codes(self, codes) -> torch.Tensor:
        """ŷ [B, L, d_out] of the layers' codes."""
        W = self.W_dec * self.mask  # a layer never writes to an earlier one
        B = _rows(codes[0])
        out = self.b_dec.expand(B, -1, -1)
        for l, code in enumerate(codes):
            out = out + decode_layer(code, W[l].reshape(self.d_sae, -1)).reshape(B, self.n_layers, self.d_out)
        return out

    def dense(self, codes) -> torch.Tensor:
        """The codes as one dense [B, L, d_sae] tensor."""
        return torch.stack([scatter(*c, self.d_sae) if isinstance(c, tuple) else c for c in codes], dim=1)

    def encode(self, x, grads=None):
        """Dense codes [B, L, d_sae] of raw inputs x [B, L, d_in]."""
        self.check_input(x)
        return self.dense(self.codes(x * self.in_scale[:, None]))

    def forward(self, x):
        """ŷ [B, L, d_out] (raw units) of raw inputs x [B, L, d_in]."""
        self.check_input(x)
        return self.decode_codes(self.codes(x * self.in_scale[:, None])) / self.out_scale[:, None]

    def loss(self, x, step=0, grads=None, target=None):
        if target is None:
            raise SaelabError("a cross-layer transcoder trains on pairs of rows: pass target=, [B, L, d_out]")
        self.check_input(x)
        codes, terms = self.train_codes(x * self.in_scale[:, None], step)
        y_hat = self.decode_codes(codes)
        err = (target * self.out_scale[:, None] - y_hat).pow(2).sum(-1).mean(0).sum()
        f = self.dense([(c[0].detach(), c[1]) if isinstance(c, tuple) else c.detach() for c in codes])
        return self._out(f, y_hat / self.out_scale[:, None], mse=err, **terms)

    # ------------------------------------------------------------------------------------------ scales
    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, median) -> None:
        """Per-layer scales (mean ‖s·x_l‖ = √d) and b_dec at each layer's target median (``median``: rows → point)."""
        for l in range(self.n_layers):
            self.in_scale[l] = self.d_in ** 0.5 / x[:, l].norm(dim=-1).mean().clamp_min(1e-12)
            self.out_scale[l] = self.d_out ** 0.5 / y[:, l].norm(dim=-1).mean().clamp_min(1e-12)
            self.b_dec[l] = median(y[:, l]) * self.out_scale[l]

    @torch.no_grad()
    def fold_input_scale(self, s: float = 1.0, s_out: float | None = None) -> None:
        """The layers' own scales folded into the weights (the trainer's scale is 1 for a CLT): raw in, raw out."""
        self.W_enc *= self.in_scale[:, None, None]
        self.W_dec /= self.out_scale[None, None, :, None]
        self.b_dec /= self.out_scale[:, None]
        self.in_scale.fill_(1.0)
        self.out_scale.fill_(1.0)

    def extra_weights(self):
        return {"in_scale": self.in_scale, "out_scale": self.out_scale}

    def load_extra_weights(self, w):
        with torch.no_grad():
            self.in_scale.copy_(w["in_scale"].float())
            self.out_scale.copy_(w["out_scale"].float())

    def saelens_cfg(self):
        cfg = super().saelens_cfg()
        cfg.update(architecture="clt", d_out=self.d_out, n_layers=self.n_layers, apply_b_dec_to_input=False)
        return cfg


def _rows(code) -> int:
    return (code[0] if isinstance(code, tuple) else code).shape[0]


class TopKCLT(CrossLayerTranscoder):
    """A CLT over TopK: k active latents per layer, through the fused sparse encode."""

    def layer_activation(self, z, l):
        return scatter(*select(z, self.cfg.k), self.d_sae)

    def layer_codes(self, x, l, kernel=None):
        return topk_encode(x.to(self.W_enc.dtype), self.W_enc[l], self.b_enc[l], self.cfg.k, kernel=kernel or self.kernel)


class ReluCLT(CrossLayerTranscoder):
    """A CLT over ReLU, with the decoder-weighted L1 over each latent's decoders to every layer it writes."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.control = SparsityController(cfg.l1_coeff, init=0.1, target=cfg.k)

    def layer_activation(self, z, l):
        return F.relu(z)

    def train_codes(self, x, step):
        codes = self.codes(x)
        norms = (self.W_dec * self.mask).flatten(2).norm(dim=-1)  # [L, d_sae]: each latent's decoders, concatenated
        l1 = sum((f * norms[l]).sum(-1).mean() for l, f in enumerate(codes))
        return codes, {"l1": self.control.coeff * self.sparsity_warmup(step) * l1}


class JumpReluCLT(CrossLayerTranscoder):
    """A CLT over JumpReLU: a threshold per layer and latent, trained through the straight-through estimators."""

    latent_weights = ("threshold",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((self.n_layers, self.d_sae), math.log(cfg.init_threshold)))
        self.control = SparsityController(cfg.l0_coeff, init=0.05, target=cfg.k)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def layer_activation(self, z, l):
        return z * (z > self.threshold[l]).to(z.dtype)

    def train_codes(self, x, step):
        theta = self.threshold  # computed once: each STE takes its layer's row of this tensor
        zs = [self.layer_pre_acts(x[:, l], l) for l in range(self.n_layers)]
        codes = [jumprelu(z, theta[l], self.cfg.bandwidth) for l, z in enumerate(zs)]
        l0 = sum(step_fn(z, theta[l], self.cfg.bandwidth).sum(-1).mean() for l, z in enumerate(zs))
        return codes, {"l0": self.control.coeff * self.sparsity_warmup(step) * l0}

    def extra_weights(self):
        return {**super().extra_weights(), "threshold": self.threshold}

    def load_extra_weights(self, w):
        super().load_extra_weights(w)
        with torch.no_grad():  # from_weights checked that it is there, shaped [L, d_sae]
            self.log_threshold.copy_(w["threshold"].float().clamp_min(1e-12).log())


for _act, _cls in (("topk", TopKCLT), ("relu", ReluCLT), ("jumprelu", JumpReluCLT)):
    CrossLayerTranscoder.by_activation[_act] = _cls
