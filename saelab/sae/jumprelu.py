"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z·H(z − θ), θ = exp(log θ) per latent;
loss = ‖x − x̂‖² + λ·L0 with straight-through estimators for θ (rectangle kernel of width ε).

The threshold enters each STE exactly once: θ is computed once per step (θ = exp(log θ)) and
passed to the two autograd functions, so ∂/∂log θ = θ·∂/∂θ is applied a single time (the
dictionary_learning #55 bug applied it twice). The input z gets the plain gradient of
z·H(z − θ) (H itself); the L0 term sends no gradient to z, only to θ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saelab.sae.base import SAE, mse
from saelab.sae.control import SparsityController


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = g * (z > theta).to(g.dtype)
        gtheta = (-(theta / eps) * _rect((z - theta) / eps) * g).sum(0)
        return gz, gtheta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gtheta = (-(1.0 / eps) * _rect((z - theta) / eps) * g).sum(0)
        return torch.zeros_like(z), gtheta, None


def jumprelu(z, theta, eps):
    return _JumpReLU.apply(z, theta, eps)


def step_fn(z, theta, eps):
    return _Step.apply(z, theta, eps)


class JumpReluSAE(SAE):
    arch = "jumprelu"
    saelens_arch = "jumprelu"
    latent_weights = ("threshold",)  # the init's threshold gives other codes: every file holds the trained one

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(cfg.init_threshold)))
        self.control = SparsityController(cfg.l0_coeff, init=0.05, target=cfg.k)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, z, grads=None):
        return z * (z > self.threshold).to(z.dtype)

    def loss(self, x, step=0, grads=None, target=None):
        """``target``: what x̂ reconstructs (a transcoder's paired output; default x itself)."""
        z = self.pre_acts(x)
        theta = self.threshold  # computed once; both STEs take this tensor
        f = jumprelu(z, theta, self.cfg.bandwidth)
        x_hat = self.decode(f)
        l0 = step_fn(z, theta, self.cfg.bandwidth).sum(-1).mean()
        coeff = self.control.coeff * self.sparsity_warmup(step)
        return self._out(f, x_hat, mse=mse(x if target is None else target, x_hat), l0=coeff * l0)

    def extra_weights(self):
        return {"threshold": self.threshold}

    def load_extra_weights(self, w):
        with torch.no_grad():  # from_weights checked that it is there, shaped [d_sae] (SAELens's name and layout)
            self.log_threshold.copy_(w["threshold"].float().clamp_min(1e-12).log())
