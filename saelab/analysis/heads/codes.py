"""SAE codes as integers, and the count of codes unique to a task's positive examples."""

from __future__ import annotations

import numpy as np
import torch


def discretise(acts: torch.Tensor) -> torch.Tensor:
    """SAE codes [..., d_sae] → one integer each: the argmax latent, or d_sae when none fires."""
    top, code = acts.max(-1)  # the first index of the maximum, as argmax
    return torch.where(top > 0, code, acts.shape[-1])


def unique_positive_codes(codes: torch.Tensor, positive: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per head: (number of codes seen on positives and never on negatives, that number / distinct codes).

    codes [G, N] integers, positive [N] bool."""
    counts, fracs = [], []
    positive = positive.tolist()
    for row in codes.tolist():
        pos = {c for c, p in zip(row, positive) if p}
        neg = {c for c, p in zip(row, positive) if not p}
        only = len(pos - neg)
        counts.append(only)
        fracs.append(only / max(len(pos | neg), 1))
    return np.array(counts, dtype=np.float64), np.array(fracs, dtype=np.float64)
