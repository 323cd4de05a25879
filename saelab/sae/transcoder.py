"""Transcoders (Dunefsky et al. 2024, Ge et al. 2024) and skip transcoders (Paulo et al. 2025).

A transcoder reads x at one hook (an MLP's input, ``cfg.hook_name``) and reconstructs y at another
(that MLP's output, ``cfg.hook_name_out``): f = σ(x W_enc + b_enc), ŷ = f W_dec + b_dec, with
W_dec [d_sae, d_out] and b_dec [d_out] in the output space (so b_dec is never subtracted from x).
A skip transcoder adds a linear path, ŷ = f W_dec + b_dec + x W_skipᵀ (W_skip [d_out, d_in], zero
at the start).

σ is the activation of one of the autoencoder architectures (``cfg.act_fn``: topk, relu or
jumprelu), with that architecture's sparsity term, aux loss, decoder constraint and settings
(--k, --l1-coeff, --bandwidth, ...): the transcoder of an activation is a class over both
(``TopKTranscoder`` = ``Transcoder`` + ``TopKSAE``), and ``Transcoder(cfg)`` builds the one cfg.act_fn
names. The loss is that architecture's with the reconstruction target y (‖y − ŷ‖² + its terms);
a skip transcoder's sparse part trains on y − x W_skipᵀ, which is the same loss, ‖y − ŷ‖², with the
gradient reaching W_skip through the target. The encoder starts as independent random unit
columns times the architecture's ``enc_init`` (tying it to the decoder, as the SAEs do, would pair
each latent's input and output directions for no reason).

Files: SAELens's transcoder layout (cfg.json ``d_out``, ``apply_b_dec_to_input`` false, W_skip
[d_out, d_in]). ReLU and JumpReLU transcoders are SAELens's ``transcoder`` / ``skip_transcoder`` /
``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``; a TopK one is written as ``topk_transcoder``
(``topk_skip_transcoder``), a name SAELens refuses rather than one it would read with another
activation.
"""

from __future__ import annotations

import torch
from torch import nn

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import _NO_INIT, SAE
from saelab.sae.family import ByActivation
from saelab.sae.jumprelu import JumpReluSAE
from saelab.sae.relu import ReluSAE
from saelab.sae.topk import TopKSAE


class Transcoder(ByActivation, SAE):
    """Reads ``hook_name``, reconstructs ``hook_name_out``; ``Transcoder(cfg)`` is the class of cfg.act_fn."""

    arch = "transcoder"
    skip = False
    #: cfg.act_fn → this transcoder over that activation's architecture
    by_activation: dict[str, type] = {}

    def __init__(self, cfg: SAEConfig):
        no_init = _NO_INIT.get()
        token = _NO_INIT.set(True)  # the base's W_enc and W_dec are allocated, not drawn: the ones below replace them
        try:
            super().__init__(cfg)
        finally:
            _NO_INIT.reset(token)
        d_in, d_out, d_sae = cfg.d_in, cfg.output_dim, cfg.d_sae
        self.apply_b_dec_to_input = False  # b_dec is in the output space
        if no_init:  # SAE.from_weights: the weights replace these
            self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        else:
            w = torch.randn(d_sae, d_out)
            self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True))
            e = torch.randn(d_in, d_sae)
            enc_init = self.enc_init if cfg.enc_init is None else cfg.enc_init
            self.W_enc = nn.Parameter(e / e.norm(dim=0, keepdim=True) * enc_init)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))

    @classmethod
    def weight_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        shapes = super(Transcoder, cls.concrete(cfg)).weight_shapes(cfg)  # the activation's (JumpReLU: threshold)
        if cls.skip:
            shapes["W_skip"] = (cfg.output_dim, cfg.d_in)
        return shapes

    def loss(self, x, step=0, grads=None, target=None):
        if target is None:
            raise SaelabError("a transcoder trains on pairs of rows: pass target=, the rows of its output hook")
        if not self.skip:
            return super().loss(x, step, grads, target=target)
        s = self.skip_path(x)
        out = super().loss(x, step, grads, target=target - s)
        out["x_hat"] = out["x_hat"] + s  # the whole output, for metrics
        return out

    def skip_path(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def add_skip(self, x, x_hat):
        return x_hat + self.skip_path(x) if self.skip else x_hat

    def forward(self, x):
        return self.add_skip(x, self.decode(self.encode(x)))

    @torch.no_grad()
    def fold_input_scale(self, s: float, s_out: float | None = None) -> None:
        """Trained on (s·x → s_out·y); make it map raw x to raw y. Codes are unchanged (thresholds stay)."""
        s_out = s if s_out is None else s_out
        self.W_enc *= s
        self.W_dec /= s_out
        self.b_dec /= s_out
        if self.skip:
            self.W_skip *= s / s_out

    def extra_weights(self):
        w = super().extra_weights()
        return {**w, "W_skip": self.W_skip} if self.skip else w

    def load_extra_weights(self, w):
        super().load_extra_weights(w)
        if self.skip:
            with torch.no_grad():  # from_weights checked that it is there, shaped [d_out, d_in]
                self.W_skip.copy_(w["W_skip"].float())

    def saelens_cfg(self):
        cfg = super().saelens_cfg()
        cfg.update(architecture=self.saelens_arch, d_out=self.cfg.output_dim, apply_b_dec_to_input=False,
                   hook_name_out=self.cfg.hook_name_out)
        cfg["metadata"] = {**cfg["metadata"], "hook_name_out": self.cfg.hook_name_out}
        return cfg


class SkipTranscoder(Transcoder):
    """A transcoder with a linear skip path x W_skipᵀ."""

    arch = "skip-transcoder"
    skip = True
    by_activation: dict[str, type] = {}


#: (act_fn, the autoencoder whose activation and loss it takes, SAELens's name without and with the skip path)
_FAMILIES = (("topk", TopKSAE, "topk_transcoder", "topk_skip_transcoder"),
             ("relu", ReluSAE, "transcoder", "skip_transcoder"),
             ("jumprelu", JumpReluSAE, "jumprelu_transcoder", "jumprelu_skip_transcoder"))

for _act, _family, _plain, _skipped in _FAMILIES:
    for _coder, _name in ((Transcoder, _plain), (SkipTranscoder, _skipped)):
        _cls = type(f"{_family.__name__.removesuffix('SAE')}{_coder.__name__}", (_coder, _family),
                    {"saelens_arch": _name, "__module__": __name__,
                     "__doc__": f"A {_coder.arch} over the {_act} activation."})
        _coder.by_activation[_act] = _cls
        globals()[_cls.__name__] = _cls
