"""Gradient SAE (g-SAE, "Features that Make a Difference"): TopK selection on the score
s = z + β·z ⊙ |W_dec ∇ₓL|, where ∇ₓL is the stored gradient of the model's loss at that
activation (``saelab harvest --with-grads``); the kept values are z's (through ReLU). Without
gradients (inference on new text), encode falls back to plain TopK on z."""

from __future__ import annotations

import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.sae.base import mse
from saelab.sae.topk import TopKSAE, scatter


class GradientSAE(TopKSAE):
    arch = "gradient"
    needs_grads = True

    def activation(self, z, grads=None, k=None):
        if grads is None:
            return super().activation(z, k=k)
        score = z + self.cfg.grad_beta * z * (grads @ self.W_dec.t()).abs()
        idx = score.topk(k or self.cfg.k, dim=-1).indices
        return scatter(F.relu(z.gather(-1, idx)), idx, self.d_sae)

    def loss(self, x, step=0, grads=None):
        if grads is None:
            raise SaelabError("the gradient SAE trains on stored gradients: harvest with --with-grads")
        z = self.pre_acts(x)
        f = self.activation(z, grads)
        x_hat = self.decode(f)
        return self._out(f, x_hat, mse=mse(x, x_hat), aux=self.aux_k_loss(x, x_hat))

    def saelens_cfg(self):
        return {**super().saelens_cfg(), "architecture": "topk"}
