"""BatchTopK SAE (Bussmann et al. 2024): in training keep the k·B largest ReLU(z) over the
whole batch (under DDP: over each rank's slice of the global batch, k·B/N per rank); a threshold θ (EMA of the smallest kept value per batch) replaces the batch
selection at inference, so a token's code never depends on its batch: f = z·[z > θ].
Saved for SAELens as a JumpReLU with θ for every latent (as SAELens itself does).

Training selects sparse (``SAE.batch_sparse_codes``: the entries above a floor under θ, the batch's k·B best of them
kept, decoded and differentiated through them) and falls back to the dense selection, the reference, at the first
step (no θ yet) and when no floor under the cut is found."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.sae.base import SAE, mse


class BatchTopKSAE(SAE):
    arch = "batchtopk"
    saelens_arch = "jumprelu"
    latent_weights = ("threshold",)  # the inference threshold: without it every positive pre-activation fires

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def activation(self, z, grads=None):
        theta = self.threshold.clamp_min(0.0)
        return z * (z > theta).to(z.dtype)

    def batch_codes(self, z):
        r = F.relu(z)
        flat = r.flatten()
        vals, idx = flat.topk(self.cfg.k * z.shape[0])
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(z)

    def loss(self, x, step=0, grads=None):
        c = self.batch_sparse_codes(x, self.cfg.k * x.shape[0], float(self.threshold)) if self.training else None
        if c is not None:
            x_hat = c.decode(self.W_dec, self.b_dec)
            return self._out(c, x_hat, mse=mse(x, x_hat), aux=self.aux_k_loss(x, x_hat))
        z = self.pre_acts(x)
        f = self.batch_codes(z) if self.training else self.activation(z)
        x_hat = self.decode(f)
        return self._out(f, x_hat, mse=mse(x, x_hat), aux=self.aux_k_loss(x, x_hat))

    @torch.no_grad()
    def after_step(self, out, step, reduce=None):
        super().after_step(out, step, reduce)
        f = out["sparse"].values if "sparse" in out else out["f"]
        pos = f[f > 0]
        low = pos.min() if pos.numel() else torch.tensor(float("inf"), device=f.device)
        if reduce is not None:  # under DDP: the smallest kept value over all ranks' slices
            low = reduce.min(low)
        if torch.isfinite(low):
            m = self.cfg.threshold_momentum
            self.threshold.copy_(low if self.threshold < 0 else m * self.threshold + (1 - m) * low)

    def extra_weights(self):
        return {"threshold": self.threshold.clamp_min(0.0).expand(self.d_sae).clone()}

    def load_extra_weights(self, w):  # from_weights checked that it is there, shaped [d_sae] (saved expanded)
        self.threshold.copy_(w["threshold"].float().reshape(-1)[0])
