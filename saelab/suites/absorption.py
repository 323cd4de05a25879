"""Feature absorption (Chanin et al. 2024, "A is for Absorption"; SAEBench's two scores, the fraction score after
Demian Till): where a property is present, how much of it the latents that usually carry it leave to others.

For one property with direction d (a planted parent's direction; a probe's, where one is trained) and rows where
it is present, latent i's part of the reconstruction's projection onto d is p_i = f_i · (W_dec,i · d). With M the
property's main latents and A the other latents aligned with d (cos(W_dec,i, d) ≥ ``ALIGN``: the ones that can
carry it; a latent of another feature overlaps d only by the chance cosine of two directions, about 1/√d_in):

- ``mean_absorption_fraction_score``: per row, Σ_{i∈A} p_i / Σ_{i∈M∪A} p_i, clipped to [0, 1] (0 where those
  latents do not project onto d), averaged over the rows: full and partial absorption, by any number of latents;
- ``mean_full_absorption_score``: the fraction of rows where every main latent is silent and one other latent
  carries at least ``FULL`` of the property's true activation on its own (p_i ≥ FULL · a, a the property's
  coefficient).

The truth suite scores each planted hierarchy parent this way (its main latent: the latent whose decoder matches
its direction best), and reports the means over the parents.
"""

from __future__ import annotations

import torch

#: the share of the property's activation one other latent must carry for a row to count as fully absorbed
FULL = 0.4
#: the cosine with the property's direction from which a latent other than the main ones counts as carrying it
ALIGN = 0.5


def absorption(codes: torch.Tensor, W_dec: torch.Tensor, direction: torch.Tensor, main, activation: torch.Tensor) \
        -> tuple[float, float]:
    """(absorption fraction, full absorption) over rows where the property is present: ``codes`` [N, d_sae] their
    codes, ``W_dec`` [d_sae, d], ``direction`` [d] (unit), ``main`` the main latents' ids, ``activation`` [N] the
    property's true activation on each row."""
    if len(codes) == 0:
        return 0.0, 0.0
    main = torch.as_tensor(list(main), dtype=torch.long)
    W, d = W_dec.float(), direction.float() / direction.float().norm().clamp_min(1e-12)
    aligned = (W @ d) / W.norm(dim=1).clamp_min(1e-12) >= ALIGN
    aligned[main] = False
    part = codes.float() * (W @ d)  # [N, d_sae]: p_i per row
    others = torch.where(aligned, part, torch.zeros_like(part))
    carried = others.sum(1)
    total = part[:, main].sum(1) + carried
    frac = torch.where(total > 0, (carried / total.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(total))
    full = (codes[:, main] == 0).all(1) & (others.max(1).values >= FULL * activation.float())
    return float(frac.mean()), float(full.float().mean())
