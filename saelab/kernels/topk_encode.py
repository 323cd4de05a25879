"""``topk_encode(x, W_enc, b_enc, k, signed=False) -> (values [B, k], indices [B, k])``: the public
TopK encode and its sparse backward (``_TopKEncode``).

Semantics: ``x`` is already centred; z = x W_enc + b_enc. Unsigned: the k largest z, values
through ReLU (= TopK(ReLU(z)) up to zero-valued picks). Signed (AbsTopK): the k largest |z|,
values keep their sign.

Paths, chosen by ``kernel`` (``auto`` reads ``SAELAB_KERNEL``, else picks by device; the rules are
``dispatch.py``'s):

* ``reference`` (``reference.py``): ``torch.topk`` of the full pre-activation — the ground truth.
* ``chunked`` (``chunked.py``): blocks of rows × chunks of latents, a running top-k.
* ``screened`` (``screened.py``, CPU, fp32): a bf16 screen, the candidates rescored exactly in
  fp32 — the same results as chunked. Other dtypes, autocast and CUDA run chunked even when
  screened is named.
* ``triton`` (``triton_topk.py``; CUDA tensors, CPU only under ``TRITON_INTERPRET=1``): one kernel
  with a running top-k in registers.

The backward of the fused paths needs only the forward's (values, indices) and sends gradient
only through the k selected entries:
  dW_enc[:, idx] += xᵀ·dvalues and dx = dvalues·W_enc[:, idx]ᵀ as products with a sparse
  [B, d_sae] matrix (never a dense gradient), db_enc by index_add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.kernels.chunked import DEFAULT_CHUNK, DEFAULT_ROWS, chunked_select
from saelab.kernels.dispatch import auto_screen, resolve_kernel, screenable
from saelab.kernels.reference import select, topk_encode_reference
from saelab.kernels.screened import screened_select
from saelab.kernels.sparse_codes import encode_grads

# resolve_kernel and select are importable from here too: the dispatch and the rule of this encode
__all__ = ["resolve_kernel", "select", "topk_encode", "topk_encode_reference"]


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, signed, chunk, path="chunked", rows=DEFAULT_ROWS):
        if path == "triton":
            from saelab.kernels.triton_topk import triton_select
            z_sel, idx = triton_select(x, W_enc, b_enc.contiguous(), k, signed)
        elif path == "screened" and screenable(x, W_enc, b_enc):
            z_sel, idx = screened_select(x, W_enc, b_enc, k, signed, chunk, rows)
        else:
            z_sel, idx = chunked_select(x, W_enc, b_enc, k, signed, chunk, rows)
        values = z_sel if signed else F.relu(z_sel)
        ctx.save_for_backward(x, W_enc, idx, z_sel)
        ctx.signed = signed
        ctx.mark_non_differentiable(idx)
        return values, idx

    @staticmethod
    def backward(ctx, d_values, _d_idx):
        x, W_enc, idx, z_sel = ctx.saved_tensors
        dz = d_values if ctx.signed else d_values * (z_sel > 0).to(d_values.dtype)
        B, k = idx.shape
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)  # (duplicates cannot occur)
        return (*encode_grads(ctx.needs_input_grad, x, W_enc, rows, idx.flatten(), dz.flatten()),
                None, None, None, None, None)


def topk_encode(x, W_enc, b_enc, k: int, signed: bool = False, kernel: str = "auto",
                chunk: int = DEFAULT_CHUNK, rows: int = DEFAULT_ROWS):
    """(values [B, k], indices [B, k]) of the TopK rule; see the module docstring."""
    if x.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise SaelabError(f"topk_encode: x has shape {list(x.shape)}, but W_enc [{W_enc.shape[0]}, {W_enc.shape[1]}] "
                          f"needs rows of d_in {W_enc.shape[0]}: pass x shaped [batch, {W_enc.shape[0]}]")
    path = resolve_kernel(kernel, x.device)
    if path == "chunked" and auto_screen(kernel, x, W_enc, b_enc):
        path = "screened"
    if path == "reference":
        return topk_encode_reference(x, W_enc, b_enc, k, signed)
    return _TopKEncode.apply(x, W_enc, b_enc, k, signed, chunk, path, rows)
