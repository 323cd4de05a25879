"""TopK SAE (Gao et al. 2024): f = TopK(ReLU(z)) per token; aux-k loss from dead latents;
unit-norm decoder rows with the parallel gradient component removed; the encoder starts at
0.3·W_decᵀ (``enc_init``: at 1·W_decᵀ the TopK choice is made by O(1) random projections and,
under Adam, the unit-scale encoder moves too slowly relative to its size; a smaller start learns
faster but leaves more latents that never fire — docs: explanations/encoder init).

``select(z, k)`` (from ``saelab.kernels.reference``) is the one selection rule the TopK family
shares (unsigned: the k largest z, values through ReLU; signed: the k largest |z|, sign kept) —
the reference of the fused kernels.
"""

from __future__ import annotations

import torch

from saelab.kernels import sparse_decode, topk_encode
from saelab.kernels.dispatch import resolve_kernel
from saelab.kernels.reference import select
from saelab.sae.base import SAE, mse


def scatter(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Dense codes [..., d_sae] from (values, indices) [..., k]: any leading dims ([batch, pos] too)."""
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype, device=values.device).scatter(-1, indices, values)


class TopKSAE(SAE):
    arch = "topk"
    saelens_arch = "topk"
    signed = False
    enc_init = 0.3

    def activation(self, z, grads=None, k: int | None = None):
        v, i = select(z, k or self.cfg.k, self.signed)
        return scatter(v, i, self.d_sae)

    def loss(self, x, step=0, grads=None, target=None):
        """``target``: what x̂ reconstructs (a transcoder's paired output; default x itself)."""
        y = x if target is None else target
        if resolve_kernel(self.kernel, x.device) == "reference":  # the plain dense path
            f = self.activation(self.pre_acts(x))
            x_hat = self.decode(f)
            return self._out(f, x_hat, mse=mse(y, x_hat), aux=self.aux_k_loss(x, x_hat, self.signed, y))
        # fused path: no [B, d_sae] tensor in the forward or the backward
        v, i = self.fused_codes(x)
        x_hat = sparse_decode(v, i, self.W_dec, self.b_dec)
        return self._out((v.detach(), i), x_hat, mse=mse(y, x_hat), aux=self.aux_k_loss(x, x_hat, self.signed, y))

    def fused_codes(self, x, k: int | None = None, kernel: str | None = None):
        """(values [B, k], indices [B, k]) of the codes through the fused encode (``kernel``: the path, default the
        SAE's own), with no [B, d_sae] tensor: the input checked, b_dec subtracted when the SAE does."""
        self.check_input(x)
        xc = x - self.b_dec if self.apply_b_dec_to_input else x
        return topk_encode(xc, self.W_enc, self.b_enc, k or self.cfg.k, self.signed, kernel=kernel or self.kernel)

    def saelens_cfg(self):
        return {**super().saelens_cfg(), "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
