"""ReLU SAE: f = ReLU(z); loss = ‖x − x̂‖² + λ Σᵢ fᵢ‖W_dec,i‖₂, λ warmed up over the first
``sparsity_warmup`` of the steps. λ is fixed by ``l1_coeff`` or, by default, adapted so the
mean L0 reaches ``k`` (architectures are compared at equal L0)."""

from __future__ import annotations

import torch.nn.functional as F

from saelab.sae.base import SAE, mse
from saelab.sae.control import SparsityController


class ReluSAE(SAE):
    arch = "relu"
    constrain_decoder = False  # the penalty weighs each latent by its decoder norm instead
    saelens_arch = "standard"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.control = SparsityController(cfg.l1_coeff, init=0.1, target=cfg.k)

    def activation(self, z, grads=None):
        return F.relu(z)

    def loss(self, x, step=0, grads=None, target=None):
        """``target``: what x̂ reconstructs (a transcoder's paired output; default x itself)."""
        f = F.relu(self.pre_acts(x))
        x_hat = self.decode(f)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        coeff = self.control.coeff * self.sparsity_warmup(step)
        return self._out(f, x_hat, mse=mse(x if target is None else target, x_hat), l1=coeff * l1)
