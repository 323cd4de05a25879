"""Mutual feature regularisation (MFR; Marks, Paren, Krueger and Barez 2024, "Enhancing Neural Network
Interpretability with Feature-Aligned Sparse Autoencoders"): N SAEs of one architecture train together, on the same
batches and each from its own init, and a penalty pulls their dictionaries towards one another. The paper's premise:
a feature that several SAEs learn is more likely a feature of the input than one that a single SAE learns.

The penalty of a group is ``1 − mean MMCS`` over its pairs of members, where the MMCS of two dictionaries A and B is
the symmetric mean max cosine ``½ (mean_a max_b cos(a, b) + mean_b max_a cos(a, b))`` of their decoder rows. The
trainer adds ``coeff · w(step) · d_in · penalty`` to the sum of the members' own losses: ``d_in`` is the scale of a
row's squared norm in the trainer's units (mean ‖x‖ = √d_in), so ``coeff`` weighs full disagreement against the
data's variance; ``w`` ramps linearly from 0 to 1 over the first ``warmup`` of the steps (the members' dictionaries
first learn the data, then align). Each member's gradient of its own loss is the one it would get alone, so a group at
``coeff`` 0 trains N independent SAEs, the baseline the paper compares with.

``max_cosines`` takes the product in blocks of rows, so a pair of d_sae-wide dictionaries needs d_sae² · d_in
multiply-adds a direction but never a [d_sae, d_sae] matrix; its backward goes through each row's best match only
(the max's subgradient), as the reference ``mmcs_reference`` (dense matrix, autograd) does.
"""

from __future__ import annotations

import itertools

import torch

#: elements of one block of the cosine product (16 MiB of fp32)
BLOCK_ELEMENTS = 1 << 22


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)


def max_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n_a]: each row of ``a``'s best cosine with a row of ``b`` (both [n, d]; rows need not be unit)."""
    ua, ub = unit_rows(a), unit_rows(b)
    rows = max(1, BLOCK_ELEMENTS // max(1, ub.shape[0]))
    # max(dim) keeps only its indices for the backward, so each block's product is freed once its max is taken
    return torch.cat([(ua[i:i + rows] @ ub.t()).max(dim=1).values for i in range(0, ua.shape[0], rows)])


def mmcs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The symmetric mean max cosine of two dictionaries' rows (1: every atom of each has an exact twin in the
    other)."""
    return 0.5 * (max_cosines(a, b).mean() + max_cosines(b, a).mean())


def mmcs_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mmcs`` through the whole cosine matrix: the plain reference of the blocked path."""
    cos = unit_rows(a) @ unit_rows(b).t()
    return 0.5 * (cos.max(dim=1).values.mean() + cos.max(dim=0).values.mean())


def penalty(decoders: list[torch.Tensor]) -> torch.Tensor:
    """``1 − mean MMCS`` over every pair of the decoders ([d_sae, d_in] each): 0 when they agree up to order."""
    pairs = list(itertools.combinations(decoders, 2))
    return 1 - torch.stack([mmcs(a, b) for a, b in pairs]).mean()


def pair_mmcs(decoders: list[torch.Tensor]) -> dict[str, float]:
    """{"i/j": MMCS} of every pair of members i < j (no gradient): what a group's record reports."""
    with torch.no_grad():
        return {f"{i}/{j}": round(float(mmcs(decoders[i], decoders[j])), 6)
                for i, j in itertools.combinations(range(len(decoders)), 2)}


def warmup(step: int, n_steps: int, fraction: float) -> float:
    """The penalty's weight at ``step``: linear from 0 to 1 over the first ``fraction`` of ``n_steps``, then 1."""
    ramp = fraction * n_steps
    return 1.0 if ramp < 1 else min(1.0, step / ramp)
