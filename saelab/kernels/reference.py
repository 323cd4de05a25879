"""The TopK rule on a full pre-activation (``select``) and the dense encode through it
(``topk_encode_reference``): the ground truth every fused path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select(z: torch.Tensor, k: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k], indices [B, k]) of the TopK rule on a full pre-activation: unsigned, the k largest
    z with values through ReLU; signed, the k largest |z| with their sign. The one rule of the TopK family
    (``saelab.sae.topk`` uses it on its dense path) and the ground truth of the fused paths."""
    if signed:
        idx = z.abs().topk(k, dim=-1).indices
        return z.gather(-1, idx), idx
    vals, idx = z.topk(k, dim=-1)
    return F.relu(vals), idx


def topk_encode_reference(x, W_enc, b_enc, k: int, signed: bool = False):
    """``select`` of the dense pre-activation x W_enc + b_enc ([B, d_sae] at once)."""
    return select(x @ W_enc + b_enc, k, signed)
