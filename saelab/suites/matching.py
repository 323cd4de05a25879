"""One-to-one matching of two dictionaries (decoder rows, or decoder rows and planted directions) by the Hungarian
algorithm on their cosines: the pairing the truth and stability suites score."""

from __future__ import annotations

import numpy as np
import torch


def cosines(a, b, absolute: bool = False) -> np.ndarray:
    """[len(a), len(b)] cosines of the rows of ``a`` and ``b`` (float64; |cos| with ``absolute``)."""
    a = torch.as_tensor(a).detach().double().cpu()
    b = torch.as_tensor(b).detach().double().cpu()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (a @ b.T).clamp(-1.0, 1.0).numpy()
    return np.abs(cos) if absolute else cos


def matched_cosines(a, b, absolute: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine of each matched pair, rows of ``a``, rows of ``b``): the one-to-one pairing of the rows of ``a`` with
    the rows of ``b`` that maximises the summed cosine (min(len(a), len(b)) pairs)."""
    return match(cosines(a, b, absolute))


def match(cos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``matched_cosines`` of a cosine matrix already computed (``scipy.optimize.linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cos, maximize=True)
    return cos[rows, cols], rows, cols
