"""``sparse_decode(values [B, k], indices [B, k], W_dec [d_sae, d_in], b_dec) -> x̂ [B, d_in]``.

x̂ = Σⱼ valuesⱼ · W_dec[indicesⱼ] + b_dec without densifying the codes: one
``embedding_bag`` (mode "sum", per-sample weights). Its backward touches only the used decoder
rows and gives the values their gradient (rows of W_dec dotted with dx̂).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out + b_dec if b_dec is not None else out
