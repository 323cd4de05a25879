"""Archetypal SAE (Fel et al. 2025, "Archetypal SAE: Adaptive and Stable Dictionary Learning for Concept
Extraction in Large Vision Models"), the relaxed form RA-SAE: a TopK SAE whose decoder atoms live in (near) the
convex hull of the data.

The dictionary is D = exp(m) · (A C + Λ): C [n, d_in] holds ``archetypal_points`` training rows drawn before the
first step (a seeded sample of the store, in the trainer's scale; the paper takes k-means centroids of the data,
saelab the rows themselves), A [d_sae, n] is row-stochastic (each atom a convex combination of those rows), Λ
[d_sae, d_in] is the relaxation, each row of norm at most ``archetypal_delta``, and m a learned log-scale. After each
optimiser step A is projected back (negative entries to 0, each row rescaled to sum 1) and each row of Λ shrunk to
norm δ where it is longer. Atoms start as single rows of C (A one-hot on distinct rows, Λ 0), the encoder at
``enc_init`` times the unit atoms. The TopK encoder, aux-k loss and fused kernels are TopK's: they read W_dec, which
here is D (computed from A, Λ and m in the training forward, with their gradients; fixed for inference).

Saved as a TopK SAE of decoder W_dec = D (SAELens's ``topk``): what inference reads. C, A and Λ travel in training
checkpoints only.
"""

from __future__ import annotations

import torch
from torch import nn

from saelab.sae.base import _NO_INIT
from saelab.sae.topk import TopKSAE


class ArchetypalSAE(TopKSAE):
    arch = "archetypal"
    constrain_decoder = False  # the atoms' norms are the data's: the constraint is the hull, not the norm

    def __init__(self, cfg):
        super().__init__(cfg)
        d_sae, d_in, n = self.d_sae, self.d_in, cfg.archetypal_points
        # a weights file's SAE decodes with W_dec alone: its C, A and Λ stay allocated, untouched pages
        new = torch.empty if _NO_INIT.get() else torch.zeros
        w_dec = self.W_dec.data
        del self.W_dec  # D is a function of the parameters below: a buffer, not a parameter
        self.register_buffer("W_dec", w_dec)
        self.register_buffer("points", new(n, d_in))  # C: set by init_from_rows
        self.mix = nn.Parameter(new(d_sae, n))  # A, row-stochastic
        self.relax = nn.Parameter(new(d_sae, d_in))  # Λ, rows of norm ≤ δ
        self.log_scale = nn.Parameter(torch.zeros(()))  # m

    init_rows_fix = "lower --archetypal-points or harvest more tokens"

    @classmethod
    def rows_for_init(cls, cfg) -> int:
        return cfg.archetypal_points

    @torch.no_grad()
    def init_from_rows(self, x: torch.Tensor) -> None:
        """C = the rows; each atom one of them (distinct while there are enough), the encoder on the unit atoms."""
        self.points.copy_(x[: len(self.points)].to(self.points))
        n = len(self.points)  # which rows: from torch's generator, which the trainer seeds with --seed
        pick = torch.cat([torch.randperm(n) for _ in range(-(-self.d_sae // n))])[: self.d_sae]
        self.mix.zero_()
        self.mix[torch.arange(self.d_sae), pick.to(self.mix.device)] = 1.0
        self.relax.zero_()
        self.log_scale.zero_()
        self.W_dec = self.dictionary().detach()
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        enc = self.enc_init if self.cfg.enc_init is None else self.cfg.enc_init
        self.W_enc.copy_(unit.t() * enc)

    def dictionary(self) -> torch.Tensor:
        """D = exp(m) · (A C + Λ) [d_sae, d_in]."""
        return self.log_scale.exp() * (self.mix @ self.points + self.relax)

    def loss(self, x, step=0, grads=None, target=None):
        self.W_dec = self.dictionary()  # with the gradients of A, Λ and m through TopK's paths
        return super().loss(x, step, grads, target)

    @torch.no_grad()
    def after_step(self, out: dict, step: int, reduce=None) -> None:
        self.mix.clamp_(min=0)
        self.mix /= self.mix.sum(1, keepdim=True).clamp_min(1e-12)
        norm = self.relax.norm(dim=1, keepdim=True)
        self.relax *= (self.cfg.archetypal_delta / norm.clamp_min(1e-12)).clamp(max=1.0)
        self.W_dec = self.dictionary().detach()
        super().after_step(out, step, reduce)
