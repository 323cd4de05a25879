"""Gradient SAE (g-SAE, "Features that Make a Difference"): TopK selection on the score
s = z + β·z ⊙ |W_dec ∇ₓL|, where ∇ₓL is the stored gradient of the model's loss at that
activation (``saelab harvest --with-grads``); the kept values are z's (through ReLU). Without
gradients (inference on new text), encode falls back to plain TopK on z.

Training selects on the dense score (its two products, x W_enc and ∇ₓL W_decᵀ, are the step's least work) without
building the codes densely: the selected entries decode through the sparse decoder and send their gradients back
through them alone (``saelab.kernels.sparse_codes``). ``--kernel reference`` runs the dense path, the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.kernels import sparse_decode
from saelab.kernels.sparse_codes import BLOCK_ENTRIES, entries
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
        xc = self.sparse_input(x)
        if xc is not None:
            k = self.cfg.k
            with torch.no_grad():
                idx, z_sel = self._select(xc, grads.to(xc.dtype), k)
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
            v = F.relu(entries(xc, self.W_enc, self.b_enc, rows, idx.flatten(), z_sel.flatten())).view_as(idx)
            x_hat = sparse_decode(v, idx, self.W_dec, self.b_dec)
            return self._out((v.detach(), idx), x_hat, mse=mse(x, x_hat), aux=self.aux_k_loss(x, x_hat))
        z = self.pre_acts(x)
        f = self.activation(z, grads)
        x_hat = self.decode(f)
        return self._out(f, x_hat, mse=mse(x, x_hat), aux=self.aux_k_loss(x, x_hat))

    def _select(self, xc, grads, k):
        """(indices [B, k], pre-activations there [B, k]) of the k best scores z·(1 + β|∇ₓL W_decᵀ|), in blocks of
        rows (``BLOCK_ENTRIES`` pre-activations each, in place): no [B, d_sae] tensor at once."""
        B, n = xc.shape[0], self.d_sae
        block = max(1, BLOCK_ENTRIES // n)
        idx = torch.empty(B, k, dtype=torch.long, device=xc.device)
        z_sel = torch.empty(B, k, dtype=xc.dtype, device=xc.device)
        for r0 in range(0, B, block):
            z = torch.addmm(self.b_enc, xc[r0:r0 + block], self.W_enc)
            s = (grads[r0:r0 + block] @ self.W_dec.t()).abs_().mul_(self.cfg.grad_beta).add_(1.0).mul_(z)
            i = s.topk(k, dim=-1).indices
            idx[r0:r0 + block] = i
            z_sel[r0:r0 + block] = z.gather(-1, i)
        return idx, z_sel

    def saelens_cfg(self):
        return {**super().saelens_cfg(), "architecture": "topk"}
