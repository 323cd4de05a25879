"""``sparse_decode(values [B, k], indices [B, k], W_dec [d_sae, d_in], b_dec) -> x̂ [B, d_in]``.

x̂ = Σⱼ valuesⱼ · W_dec[indicesⱼ] + b_dec without densifying the codes: one
``embedding_bag`` (mode "sum", per-sample weights). With ``offsets`` [B], values and indices are
1-D [nnz], row b's entries from offsets[b] to the next offset (rows of any length, e.g. ReLU's).
Its backward touches only the used decoder
rows and gives the values their gradient (rows of W_dec dotted with dx̂).

On CUDA, ``embedding_bag``'s backward with per-sample weights has no bf16 kernel and
``torch.sparse.mm`` (the encode's backward) none for bf16 or fp16 (it raises ``NotImplementedError
... for 'BFloat16'``). So half-precision tensors on such a device take those steps in fp32
(``half_in_fp32``): the same sums with fp32 accumulation, cast back to the parameters' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# devices whose sparse backward kernels lack bf16/fp16 (embedding_bag per-sample weights, sparse.mm);
# tests add "cpu" to run the fp32 detour where they can
NO_HALF_SPARSE_GRAD = {"cuda"}


def half_in_fp32(t: torch.Tensor) -> bool:
    """True when t is bf16/fp16 on a device whose sparse backward kernels lack those dtypes."""
    return t.device.type in NO_HALF_SPARSE_GRAD and t.dtype in (torch.bfloat16, torch.float16)


def _upcast(values: torch.Tensor, W_dec: torch.Tensor) -> bool:
    return half_in_fp32(W_dec) and torch.is_grad_enabled() and (W_dec.requires_grad or values.requires_grad)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    if _upcast(values, W_dec):
        out = F.embedding_bag(indices, W_dec.float(), offsets, per_sample_weights=values.float(), mode="sum")
        out = out.to(W_dec.dtype)
    else:
        out = F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out + b_dec if b_dec is not None else out
