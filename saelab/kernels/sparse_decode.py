"""``sparse_decode(values [B, k], indices [B, k], W_dec [d_sae, d_in], b_dec) -> x̂ [B, d_in]``.

x̂ = Σⱼ valuesⱼ · W_dec[indicesⱼ] + b_dec without densifying the codes: one
``embedding_bag`` (mode "sum", per-sample weights). Its backward touches only the used decoder
rows and gives the values their gradient (rows of W_dec dotted with dx̂).

On CUDA, ``embedding_bag``'s backward with per-sample weights has no bf16 kernel (torch 2.11:
``NotImplementedError ... for 'BFloat16'``, found on an H200), so a half-precision decode that needs
a gradient there runs the bag in fp32 and casts the result back: the same sum with fp32
accumulation, and gradients that reach bf16/fp16 parameters through the casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# devices whose embedding_bag backward lacks half-precision per-sample weights (tests add "cpu")
NO_HALF_BAG_GRAD = {"cuda"}


def _upcast(values: torch.Tensor, W_dec: torch.Tensor) -> bool:
    return (W_dec.device.type in NO_HALF_BAG_GRAD and W_dec.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and (W_dec.requires_grad or values.requires_grad))


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    if _upcast(values, W_dec):
        out = F.embedding_bag(indices, W_dec.float(), per_sample_weights=values.float(), mode="sum")
        out = out.to(W_dec.dtype)
    else:
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out + b_dec if b_dec is not None else out
