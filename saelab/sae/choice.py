"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
Choice Sparse Autoencoders", arXiv 2411.02124).

One idea, two rules. In training, the matches between a batch's B tokens and the d_sae latents are allocated under one
budget for the whole batch, ≈ k·B matches (k per token on average), instead of TopK's k for every token:

* ``mutualchoice``: the k·B largest ReLU(z) of the whole [B, d_sae] matrix, nothing else constrained (a token gets as
  many latents as it wins). The rule is the one BatchTopK trains with.
* ``featurechoice``: each latent takes the m largest ReLU(z) of its column, its m best tokens of the batch, with
  m = round(k·B / d_sae) (``--fc-m`` sets it), so m·d_sae ≈ k·B in all; every latent fires on m tokens of every batch
  (those of them where z > 0), so none starves.

Inference sees no batch: a threshold θ per latent replaces the selection, f_j = z_j·[z_j > θ_j], so a token's code
never depends on the rows beside it. θ is an EMA (``--threshold-momentum``) of the smallest value the selection kept
in a batch: over the whole matrix for mutual choice (one cut for all latents, as BatchTopK's), over each latent's own
column for feature choice (its kept set is its top m, so its m-th value is its cut; one θ per latent). A latent that
has not yet kept a positive value has θ < 0, read as 0 (ReLU). Saved for SAELens as a JumpReLU holding θ.

Dead and underused latents (``aux_zipf_loss``): aux-k's form (Gao et al. 2024: the detached residual reconstructed
from the top ``--k-aux`` pre-activations of the auxiliary latents, no b_dec, times ``--aux-coeff`` ·
min(n_aux / k_aux, 1)) over a wider set than aux-k's dead latents: the dead ones and the underused ones, whose firing
density (an EMA over steps) is below ``UNDERUSED`` of what a Zipf law fitted to the densities gives at their rank. The
law (log density linear in log rank, least squares) is fitted to the upper half of the ranks, where the paper finds
the densities follow it; the lower end, where they fall away from it, is where latents die. With no latent below the
curve it is aux-k's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.kernels.chunked import DEFAULT_CHUNK, DEFAULT_ROWS, chunked_select
from saelab.kernels.sparse_codes import entries, from_entries
from saelab.sae.base import SAE, mse

#: EMA momentum, per step, of each latent's firing density (the fraction of a batch's tokens it fires on)
DENSITY_MOMENTUM = 0.99
#: a latent is underused below this fraction of the Zipf density at its rank
UNDERUSED = 0.5


def mutual_choice(z: torch.Tensor, n: int) -> torch.Tensor:
    """Codes [B, d_sae] keeping the n largest ReLU(z) of the whole matrix z [B, d_sae]."""
    r = F.relu(z)
    flat = r.flatten()
    vals, idx = flat.topk(n)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(r)


def feature_choice(z: torch.Tensor, m: int) -> torch.Tensor:
    """Codes [B, d_sae] keeping, in each latent's column of z [B, d_sae], its m largest ReLU(z)."""
    r = F.relu(z)
    vals, idx = r.topk(m, dim=0)
    return torch.zeros_like(r).scatter(0, idx, vals)


def zipf_expected(density: torch.Tensor) -> torch.Tensor | None:
    """Each latent's density under the Zipf law d(r) = C·r^(−α) fitted (least squares of log d on log r) to the
    densities ranked in decreasing order, over the upper half of the ranks (those with a positive density); None when
    fewer than two such densities exist."""
    d, order = density.float().sort(descending=True)
    rank = torch.arange(1, d.numel() + 1, dtype=d.dtype, device=d.device)
    head = (rank <= max(2, d.numel() // 2)) & (d > 0)
    if int(head.sum()) < 2:
        return None
    lr, ld = rank[head].log(), d[head].log()
    lc = lr - lr.mean()
    slope = (lc * (ld - ld.mean())).sum() / lc.pow(2).sum().clamp_min(1e-12)
    fit = (ld.mean() + slope * (rank.log() - lr.mean())).exp()
    return torch.empty_like(fit).scatter_(0, order, fit)


class ChoiceSAE(SAE):
    """The shared part: the batch-budget selection in training (``select``), per-latent thresholds at inference
    (their per-batch estimate ``kept_floor``), and ``aux_zipf_loss``."""

    saelens_arch = "jumprelu"
    latent_weights = ("threshold",)  # the inference thresholds: without them every positive pre-activation fires

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((self.d_sae,), -1.0))  # < 0: not estimated yet
        self.register_buffer("density", torch.full((self.d_sae,), -1.0))  # < 0: no batch seen yet
        self.register_buffer("underused", torch.zeros(self.d_sae, dtype=torch.bool))

    def select(self, z: torch.Tensor) -> torch.Tensor:
        """The training codes of a batch's pre-activations z [B, d_sae]."""
        raise NotImplementedError

    def kept_floor(self, f: torch.Tensor) -> torch.Tensor:
        """Each latent's cut in this batch [d_sae]: the smallest positive code the selection kept (inf: none), of the
        dense codes f [B, d_sae]."""
        raise NotImplementedError

    def activation(self, z, grads=None):
        return z * (z > self.threshold.clamp_min(0.0)).to(z.dtype)

    def sparse_select(self, x: torch.Tensor):
        """The training codes as SparseCodes (a sparse path), or None: the dense ``select``."""
        return None

    def loss(self, x, step=0, grads=None):
        c = self.sparse_select(x) if self.training else None
        if c is not None:
            x_hat = c.decode(self.W_dec, self.b_dec)
            return self._out(c, x_hat, mse=mse(x, x_hat), aux=self.aux_zipf_loss(x, x_hat))
        z = self.pre_acts(x)
        f = self.select(z.reshape(-1, self.d_sae)).view_as(z) if self.training else self.activation(z)
        x_hat = self.decode(f)
        return self._out(f, x_hat, mse=mse(x, x_hat), aux=self.aux_zipf_loss(x, x_hat))

    def aux_latents(self) -> torch.Tensor:
        """The latents aux_zipf_loss reads [d_sae] (bool): the dead and the underused."""
        return self.dead_mask() | self.underused

    def aux_zipf_loss(self, x, x_hat) -> torch.Tensor | None:
        """aux-k's loss (``SAE.aux_k_loss``) over the auxiliary latents: the dead and the underused."""
        return self.aux_k_loss(x, x_hat, latents=self.aux_latents())

    @torch.no_grad()
    def after_step(self, out, step, reduce=None):
        super().after_step(out, step, reduce)
        if "sparse" in out:
            c = out["sparse"]
            pos = c.values > 0
            least = torch.full((self.d_sae,), float("inf"), dtype=c.values.dtype, device=c.values.device)
            least.scatter_reduce_(0, c.cols[pos], c.values[pos], "amin")
            low = self.kept_floor(least[None])  # each latent's least kept code, as a one-row matrix of codes
            frac = torch.bincount(c.cols[c.active()], minlength=self.d_sae).float() / max(1, c.n_rows)
        else:
            f = out["f"].reshape(-1, self.d_sae)
            low = self.kept_floor(f)
            frac = (f != 0).float().mean(0)
        if reduce is not None:  # under DDP: the smallest cut over all ranks' slices, the mean density
            low, frac = reduce.min(low), reduce.mean(frac)
        m = self.cfg.threshold_momentum
        ema = torch.where(self.threshold < 0, low, m * self.threshold + (1 - m) * low)
        self.threshold.copy_(torch.where(torch.isfinite(low), ema, self.threshold))
        self.density.copy_(torch.where(self.density < 0, frac,
                                       DENSITY_MOMENTUM * self.density + (1 - DENSITY_MOMENTUM) * frac))
        expected = zipf_expected(self.density)
        self.underused.copy_(self.density < UNDERUSED * expected if expected is not None
                             else torch.zeros_like(self.underused))

    def extra_weights(self):
        return {"threshold": self.threshold.clamp_min(0.0).clone()}

    def load_extra_weights(self, w):  # from_weights checked that it is there, shaped [d_sae]
        self.threshold.copy_(w["threshold"].float().reshape(-1))


def _floor(f: torch.Tensor, dim=None) -> torch.Tensor:
    pos = f.masked_fill(f <= 0, float("inf"))
    return pos.min() if dim is None else pos.min(dim).values


class MutualChoiceSAE(ChoiceSAE):
    arch = "mutualchoice"

    def select(self, z):
        return mutual_choice(z, self.cfg.k * z.shape[0])

    def sparse_select(self, x):  # from under the last batches' cut (every latent's θ is that one cut)
        return self.batch_sparse_codes(x, self.cfg.k * x.shape[0], float(self.threshold.max()))

    def kept_floor(self, f):  # one cut for the whole matrix, every latent's
        return _floor(f).expand(self.d_sae).clone()


class FeatureChoiceSAE(ChoiceSAE):
    arch = "featurechoice"

    def tokens_per_latent(self, batch: int) -> int:
        """m: the tokens each latent takes from a batch of ``batch`` rows (under DDP, a rank's slice)."""
        k, d = self.cfg.k, self.d_sae
        m = self.cfg.fc_m if self.cfg.fc_m is not None else int(k * batch / d + 0.5)
        if m < 1:
            raise SaelabError(f"--arch featurechoice: each latent takes m = round(k·B/d_sae) = round({k}·{batch}/{d}) "
                              f"= 0 tokens of a batch of {batch} rows: raise --batch-size to at least "
                              f"{-(-d // (2 * k))}, raise --k, or pass --fc-m 1")
        if m > batch:
            raise SaelabError(f"--fc-m {m} is more tokens than a batch holds ({batch} rows): lower --fc-m or raise "
                              "--batch-size")
        return m

    def select(self, z):
        return feature_choice(z, self.tokens_per_latent(z.shape[0]))

    def sparse_select(self, x):
        """Each latent's m best tokens without the [B, d_sae] matrix: the chunked TopK selection of the transposed
        product W_encᵀ (x − b_dec)ᵀ (a latent's row of it; its bias is constant along the row, so it changes no
        choice and is added after), the positive entries kept in row order with the sparse backward. None on the
        reference kernel (the dense ``select``, the reference) and for inputs other than [B, d_in] rows."""
        xc = self.sparse_input(x)
        if xc is None:
            return None
        B = x.shape[0]
        m = self.tokens_per_latent(B)
        with torch.no_grad():
            zt, tok = chunked_select(self.W_enc.t(), xc.t(), xc.new_zeros(B), m, False, DEFAULT_CHUNK, DEFAULT_ROWS)
            z = zt + self.b_enc[:, None]
            lat = torch.arange(self.d_sae, device=x.device)[:, None].expand_as(tok)
            keep = z > 0
            rows, cols, z = tok[keep], lat[keep], z[keep]
            order = (rows * self.d_sae + cols).argsort()
            rows, cols, z = rows[order], cols[order], z[order]
        return from_entries(rows, cols, entries(xc, self.W_enc, self.b_enc, rows, cols, z), B)

    def kept_floor(self, f):  # each latent's own cut: the smallest of its kept top m
        return _floor(f, 0)
