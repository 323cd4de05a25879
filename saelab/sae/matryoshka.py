"""Matryoshka SAE: nested dictionaries, so early latents carry the general features.

* ``prefix`` mode (Bussmann et al. 2025; Nabeshima 2024): one TopK code; the loss sums the
  reconstruction error of every prefix of the latents (default ¼, ½, 1 of d_sae).
* ``k`` mode (MSAE, "Interpreting CLIP with Hierarchical SAEs"): several TopK codes with
  increasing k (default k/4, k/2, k), losses summed with uniform or reverse weights (reverse:
  the smallest k weighs most).
Inference uses TopK with the largest k.

Training takes the fused path by default (as TopK does; ``--kernel reference`` for the dense
one): one ``topk_encode`` (its (values, indices) come best first), then per prefix a sparse
decode with the values of latents ≥ m zeroed (prefix mode), or of the first kᵢ columns (k
mode: the top-kᵢ of a best-first top-k_max are its first kᵢ entries)."""

from __future__ import annotations

from saelab.kernels import sparse_decode
from saelab.kernels.dispatch import resolve_kernel
from saelab.sae.base import mse
from saelab.sae.topk import TopKSAE, scatter, select


class MatryoshkaSAE(TopKSAE):
    arch = "matryoshka"

    def prefixes(self) -> list[int]:
        """Latent counts of the nested groups (ascending, last = d_sae)."""
        sizes = sorted({max(1, min(self.d_sae, round(p * self.d_sae))) for p in self.cfg.matryoshka_prefixes})
        return sizes if sizes[-1] == self.d_sae else sizes + [self.d_sae]

    def ks(self) -> list[int]:
        k = self.cfg.k
        ks = self.cfg.matryoshka_ks or [max(1, k // 4), max(1, k // 2), k]
        return sorted(set(ks))

    def weights(self, n: int) -> list[float]:
        return [1.0] * n if self.cfg.matryoshka_weighting == "uniform" else [2.0 * (n - i) / (n + 1) for i in range(n)]

    def loss(self, x, step=0, grads=None):
        if resolve_kernel(self.kernel, x.device) != "reference":
            return self._fused_loss(x)
        z = self.pre_acts(x)
        if self.cfg.matryoshka_mode == "prefix":
            f = self.activation(z)
            terms = {}
            for m in self.prefixes():
                x_hat_m = f[:, :m] @ self.W_dec[:m] + self.b_dec
                terms[f"mse_{m}"] = mse(x, x_hat_m)
            x_hat = x_hat_m  # the last prefix is the whole dictionary
        else:
            ks = self.ks()
            n = len(ks)
            w = self.weights(n)
            terms = {}
            for wi, ki in zip(w, ks):
                v, i = select(z, ki)
                f = scatter(v, i, self.d_sae)
                x_hat = self.decode(f)
                terms[f"mse_k{ki}"] = wi * mse(x, x_hat)
        return self._out(f, x_hat, **terms, aux=self.aux_k_loss(x, x_hat))

    def _fused_loss(self, x):
        """The same loss terms from one fused encode and sparse decodes (no [B, d_sae] tensor)."""
        terms = {}
        if self.cfg.matryoshka_mode == "prefix":
            v, i = self.fused_codes(x)
            for m in self.prefixes():
                x_hat = sparse_decode(v * (i < m).to(v.dtype), i, self.W_dec, self.b_dec)
                terms[f"mse_{m}"] = mse(x, x_hat)
        else:
            ks = self.ks()
            v, i = self.fused_codes(x, ks[-1])  # best first
            for wi, ki in zip(self.weights(len(ks)), ks):
                x_hat = sparse_decode(v[:, :ki], i[:, :ki], self.W_dec, self.b_dec)
                terms[f"mse_k{ki}"] = wi * mse(x, x_hat)
        return self._out((v.detach(), i), x_hat, **terms, aux=self.aux_k_loss(x, x_hat))

    def saelens_cfg(self):
        return {**super().saelens_cfg(), "architecture": "topk"}
