"""Matryoshka SAE: nested dictionaries, so early latents carry the general features.

* ``prefix`` mode (Bussmann et al. 2025; Nabeshima 2024): one TopK code; the loss sums the
  reconstruction error of every prefix of the latents (default ¼, ½, 1 of d_sae).
* ``k`` mode (MSAE, "Interpreting CLIP with Hierarchical SAEs"): several TopK codes with
  increasing k (default k/4, k/2, k), losses summed with uniform or reverse weights (reverse:
  the smallest k weighs most).
Inference uses TopK with the largest k."""

from __future__ import annotations

from saelab.sae.base import mse
from saelab.sae.topk import TopKSAE, select, scatter


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

    def loss(self, x, step=0, grads=None):
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
            w = [1.0] * n if self.cfg.matryoshka_weighting == "uniform" else [2.0 * (n - i) / (n + 1) for i in range(n)]
            terms = {}
            for wi, ki in zip(w, ks):
                v, i = select(z, ki)
                f = scatter(v, i, self.d_sae)
                x_hat = self.decode(f)
                terms[f"mse_k{ki}"] = wi * mse(x, x_hat)
        return self._out(f, x_hat, **terms, aux=self.aux_k_loss(x, x_hat))

    def saelens_cfg(self):
        return {**super().saelens_cfg(), "architecture": "topk"}
