"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z·H(z − θ), θ = exp(log θ) per latent;
loss = ‖x − x̂‖² + λ·L0 with straight-through estimators for θ (rectangle kernel of width ε).

The threshold enters each STE exactly once: θ is computed once per step (θ = exp(log θ)) and
passed to the two autograd functions, so ∂/∂log θ = θ·∂/∂θ is applied a single time (the
dictionary_learning #55 bug applied it twice). The input z gets the plain gradient of
z·H(z − θ) (H itself); the L0 term sends no gradient to z, only to θ.

Both STEs are elementwise in (z, θ) of one shape, or θ [d_sae] broadcast over the rows of z [B, d_sae] (its gradient
summed over them). The sparse training path (``SAE.sparse_codes``) keeps the entries z > θ − ε/2: the active ones
and those inside the kernel's window below θ, the only ones with a gradient to θ; it runs them through the same
STEs with θ gathered per entry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saelab.sae.base import SAE, mse
from saelab.sae.control import SparsityController


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _to_theta(g: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θ's gradient from the per-entry one: summed over the rows where θ was broadcast over them."""
    return g.sum(0) if g.ndim > theta.ndim else g


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
        gtheta = _to_theta(-(theta / eps) * _rect((z - theta) / eps) * g, theta)
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
        gtheta = _to_theta(-(1.0 / eps) * _rect((z - theta) / eps) * g, theta)
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

    def lr_scales(self) -> dict[str, float]:
        return {"log_threshold": self.cfg.threshold_lr} if self.cfg.threshold_lr != 1 else {}

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, z, grads=None):
        return z * (z > self.threshold).to(z.dtype)

    def loss(self, x, step=0, grads=None, target=None):
        """``target``: what x̂ reconstructs (a transcoder's paired output; default x itself)."""
        theta, eps = self.threshold, self.cfg.bandwidth  # θ computed once; both STEs take this tensor
        coeff = self.control.coeff * self.sparsity_warmup(step)
        y = x if target is None else target
        c = self.sparse_codes(x, (theta - eps / 2).detach())
        if c is not None:  # the entries above the kernel's window: every nonzero code and gradient
            z, t = c.values, theta[c.cols]
            c = c.with_values(jumprelu(z, t, eps))
            x_hat = c.decode(self.W_dec, self.b_dec)
            l0 = step_fn(z, t, eps).sum() / c.n_rows
            return self._out(c, x_hat, mse=mse(y, x_hat), l0=coeff * l0)
        z = self.pre_acts(x)
        f = jumprelu(z, theta, eps)
        x_hat = self.decode(f)
        l0 = step_fn(z, theta, eps).sum(-1).mean()
        return self._out(f, x_hat, mse=mse(y, x_hat), l0=coeff * l0)

    def extra_weights(self):
        return {"threshold": self.threshold}

    def load_extra_weights(self, w):
        with torch.no_grad():  # from_weights checked that it is there, shaped [d_sae] (SAELens's name and layout)
            self.log_threshold.copy_(w["threshold"].float().clamp_min(1e-12).log())
