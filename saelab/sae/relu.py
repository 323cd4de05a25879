"""ReLU SAE: f = ReLU(z); loss = ‖x − x̂‖² + λ Σᵢ fᵢ‖W_dec,i‖₂, λ warmed up over the first
``sparsity_warmup`` of the steps. λ is fixed by ``l1_coeff`` or, by default, adapted so the
mean L0 reaches ``k`` (architectures are compared at equal L0).

Training runs sparse (``SAE.sparse_codes``: the entries z > 0 only, decoded and differentiated through those entries)
whenever few enough latents fire; the dense path (``--kernel reference``, and the first steps, where about half of
them fire) is the reference the tests compare it with."""

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
        coeff = self.control.coeff * self.sparsity_warmup(step)
        y = x if target is None else target
        c = self.sparse_codes(x, 0.0)
        if c is not None:  # the entries z > 0 are the codes (ReLU is the identity there)
            x_hat = c.decode(self.W_dec, self.b_dec)
            l1 = (c.values * self.W_dec.norm(dim=1)[c.cols]).sum() / c.n_rows
            return self._out(c, x_hat, mse=mse(y, x_hat), l1=coeff * l1)
        f = F.relu(self.pre_acts(x))
        x_hat = self.decode(f)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self._out(f, x_hat, mse=mse(y, x_hat), l1=coeff * l1)
