"""``topk_encode(x, W_enc, b_enc, k, signed=False) -> (values [B, k], indices [B, k])``.

Semantics (DESIGN.md): ``x`` is already centred; z = x W_enc + b_enc. Unsigned: the k largest z,
values through ReLU (= TopK(ReLU(z)) up to zero-valued picks). Signed (AbsTopK): the k largest
|z|, values keep their sign.

Paths, chosen by ``kernel`` (``auto`` reads ``SAELAB_KERNEL``, else picks by device):

* ``reference``: ``torch.topk`` of the full pre-activation — the ground truth for tests.
* ``chunked``: the latent dimension in chunks of ``chunk`` columns; one GEMM per chunk, its
  top-k merged into a running top-k. Peak extra memory O(B·chunk) instead of O(B·d_sae).
  Its backward (``_TopKEncode``) sends gradient only through the k selected entries:
  dW_enc[:, idx] += xᵀ·dvalues and dx = dvalues·W_enc[:, idx]ᵀ as products with a sparse
  [B, d_sae] matrix (never a dense gradient), db_enc by index_add.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from saelab import SaelabError

KERNELS = ("auto", "reference", "chunked", "triton")
DEFAULT_CHUNK = 2048


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise SaelabError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel == "auto":
        env = os.environ.get("SAELAB_KERNEL", "").strip()
        if env:
            return resolve_kernel(env, device) if env != "auto" else "chunked"
        return "chunked"
    if kernel == "triton":
        raise SaelabError("the Triton TopK kernel is not available in this version: use --kernel chunked")
    return kernel


def topk_encode_reference(x, W_enc, b_enc, k: int, signed: bool = False):
    z = x @ W_enc + b_enc
    if signed:
        idx = z.abs().topk(k, dim=-1).indices
        return z.gather(-1, idx), idx
    vals, idx = z.topk(k, dim=-1)
    return F.relu(vals), idx


@torch.no_grad()
def _chunked_select(x, W_enc, b_enc, k: int, signed: bool, chunk: int):
    """Running top-k over latent chunks: (pre-activation values [B, k], indices [B, k])."""
    B, n = x.shape[0], W_enc.shape[1]
    best_v = best_s = best_i = None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        z = torch.addmm(b_enc[c0:c1], x, W_enc[:, c0:c1])
        score = z.abs() if signed else z
        kk = min(k, c1 - c0)
        s, i = score.topk(kk, dim=-1)
        v = z.gather(-1, i) if signed else s
        i = i + c0
        if best_s is None:
            best_v, best_s, best_i = v, s, i
        else:
            cat_s = torch.cat([best_s, s], dim=1)
            s2, j = cat_s.topk(min(k, cat_s.shape[1]), dim=-1)
            best_v = torch.cat([best_v, v], dim=1).gather(-1, j)
            best_i = torch.cat([best_i, i], dim=1).gather(-1, j)
            best_s = s2
    return best_v, best_i


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, signed, chunk):
        z_sel, idx = _chunked_select(x, W_enc, b_enc, k, signed, chunk)
        values = z_sel if signed else F.relu(z_sel)
        ctx.save_for_backward(x, W_enc, idx, z_sel)
        ctx.signed = signed
        ctx.mark_non_differentiable(idx)
        return values, idx

    @staticmethod
    def backward(ctx, d_values, _d_idx):
        x, W_enc, idx, z_sel = ctx.saved_tensors
        dz = d_values if ctx.signed else d_values * (z_sel > 0).to(d_values.dtype)
        dz = dz.to(W_enc.dtype)  # under autocast the values may be bf16; weights stay fp32
        B, k = idx.shape
        n = W_enc.shape[1]
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        # S [B, n] holds dz at the selected entries only (sparse; duplicates cannot occur)
        S = torch.sparse_coo_tensor(torch.stack([rows, idx.flatten()]), dz.flatten(), (B, n),
                                check_invariants=False).coalesce()
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.sparse.mm(S, W_enc.t()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dW = torch.sparse.mm(S.t(), x.to(W_enc.dtype)).t()
        if ctx.needs_input_grad[2]:
            db = torch.zeros(n, dtype=dz.dtype, device=dz.device).index_add_(0, idx.flatten(), dz.flatten())
        return dx, dW, db, None, None, None


def topk_encode(x, W_enc, b_enc, k: int, signed: bool = False, kernel: str = "auto",
                chunk: int = DEFAULT_CHUNK):
    """(values [B, k], indices [B, k]) of the TopK rule; see the module docstring."""
    path = resolve_kernel(kernel, x.device)
    if path == "reference":
        return topk_encode_reference(x, W_enc, b_enc, k, signed)
    return _TopKEncode.apply(x, W_enc, b_enc, k, signed, chunk)
