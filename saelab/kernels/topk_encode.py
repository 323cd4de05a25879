"""``topk_encode(x, W_enc, b_enc, k, signed=False) -> (values [B, k], indices [B, k])``.

Semantics (DESIGN.md): ``x`` is already centred; z = x W_enc + b_enc. Unsigned: the k largest z,
values through ReLU (= TopK(ReLU(z)) up to zero-valued picks). Signed (AbsTopK): the k largest
|z|, values keep their sign.

Paths, chosen by ``kernel`` (``auto`` reads ``SAELAB_KERNEL``, else picks by device):

* ``reference``: ``torch.topk`` of the full pre-activation — the ground truth for tests.
* ``chunked`` (CPU, and CUDA without triton): rows in blocks of ``rows``, the latent dimension in
  chunks of ``chunk``; one ``addmm`` per block, merged into a running top-k, where after the first
  chunk only entries above the running k-th score are candidates (see ``_chunked_select``).
  Peak extra memory O(rows·chunk) instead of O(B·d_sae). Values come best first.
* ``triton`` (CUDA tensors; CPU only under ``TRITON_INTERPRET=1``): ``triton_topk.py``, one kernel
  with a running top-k in registers.

The backward of both fused paths (``_TopKEncode``) needs only the forward's (values, indices) and
sends gradient only through the k selected entries:
  dW_enc[:, idx] += xᵀ·dvalues and dx = dvalues·W_enc[:, idx]ᵀ as products with a sparse
  [B, d_sae] matrix (never a dense gradient), db_enc by index_add.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from saelab import SaelabError

KERNELS = ("auto", "reference", "chunked", "triton")
DEFAULT_CHUNK = 4096
DEFAULT_ROWS = 4096


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_available() -> bool:
    """Whether ``import triton`` works (cached)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
    return _TRITON_OK


_TRITON_OK: bool | None = None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The path for tensors on ``device``: an explicit kernel wins over ``SAELAB_KERNEL``, which
    wins over auto (triton on CUDA tensors when triton imports, else chunked; never triton on CPU)."""
    if kernel not in KERNELS:
        raise SaelabError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if kernel == "auto":
        env = os.environ.get("SAELAB_KERNEL", "").strip()
        if env and env != "auto":
            if env not in KERNELS:
                raise SaelabError(f"SAELAB_KERNEL={env!r} is not a kernel: choose one of {', '.join(KERNELS)}")
            return resolve_kernel(env, device)
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if kernel == "triton":
        if device.type != "cuda" and not _interpreting():
            raise SaelabError(f"the Triton kernel needs CUDA tensors (these are on {device.type}): "
                              "use --kernel chunked, or set TRITON_INTERPRET=1 to run it in the interpreter")
        if not triton_available():
            raise SaelabError("triton is not installed: pip install triton, or use --kernel chunked")
    return kernel


def topk_encode_reference(x, W_enc, b_enc, k: int, signed: bool = False):
    z = x @ W_enc + b_enc
    if signed:
        idx = z.abs().topk(k, dim=-1).indices
        return z.gather(-1, idx), idx
    vals, idx = z.topk(k, dim=-1)
    return F.relu(vals), idx


def _merge(best_s, best_v, best_i, s, v, i, k: int):
    """Running top-k: the k best of the kept and the new candidates (sorted, best first)."""
    if best_s is None:
        return s, v, i
    cat_s = torch.cat([best_s, s], dim=1)
    s2, j = cat_s.topk(k, dim=-1)
    v2 = s2 if v is None else torch.cat([best_v, v], dim=1).gather(-1, j)
    return s2, v2, torch.cat([best_i, i], dim=1).gather(-1, j)


@torch.no_grad()
def _chunked_select(x, W_enc, b_enc, k: int, signed: bool, chunk: int, rows: int = DEFAULT_ROWS):
    """(pre-activation values [B, k], indices [B, k]) of the k best latents, best first.

    Rows in blocks of ``rows``, latents in chunks of ``chunk``, so each [rows, chunk]
    pre-activation block stays in cache between its GEMM and its selection. The first chunk of
    a row block is selected with ``topk``; after it, the running k-th score is a lower bound on
    the final k-th, so a chunk's candidates are only its entries above that threshold (one
    compare + ``nonzero``: typically a handful per row, where ``topk`` would sort-select over
    the whole chunk); they are packed into a small padded block and merged by ``topk``."""
    B, n = x.shape[0], W_enc.shape[1]
    out_v = out_i = None
    # one pre-activation buffer and one mask buffer reused by every block: a fresh allocation of
    # this size per chunk would be a fresh mmap, i.e. page faults and zeroing on every chunk
    dtype = torch.promote_types(x.dtype, W_enc.dtype)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # cast once, as autocast's addmm would per chunk
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _chunked_select(x.to(dtype), W_enc.to(dtype), b_enc.to(dtype), k, signed, chunk, rows)
    zbuf = torch.empty(min(rows, B) * min(chunk, n), dtype=dtype, device=x.device)
    mbuf = torch.empty(zbuf.numel(), dtype=torch.bool, device=x.device)
    sbuf = torch.empty(zbuf.numel() if signed else 0, dtype=dtype, device=x.device)
    for r0 in range(0, B, rows):
        xb = x[r0:r0 + rows]
        rb = xb.shape[0]
        best_s = best_v = best_i = None
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            size = rb * (c1 - c0)
            z = torch.addmm(b_enc[c0:c1], xb, W_enc[:, c0:c1], out=zbuf[:size].view(rb, c1 - c0))
            score = torch.abs(z, out=sbuf[:size].view(rb, c1 - c0)) if signed else z
            have = 0 if best_s is None else best_s.shape[1]
            r = c = None
            if have == k:
                mask = torch.gt(score, best_s[:, -1:], out=mbuf[:size].view(rb, c1 - c0))
                r, c = mask.nonzero(as_tuple=True)
                if r.numel() == 0:
                    continue
                if r.numel() > rb * (c1 - c0) // 8:  # too many: a dense top-k is cheaper
                    r = None
            if r is None:  # dense selection within the chunk
                s, i = score.topk(min(k, c1 - c0), dim=-1)
                v = z.gather(-1, i) if signed else None
                i = i + c0
            else:  # pack the candidates above the threshold into [rb, max count], padded with -inf
                cnt = torch.bincount(r, minlength=rb)
                pos = torch.arange(r.numel(), device=r.device) - (cnt.cumsum(0) - cnt)[r]
                width = int(cnt.max())
                s = score.new_full((rb, width), float("-inf"))
                s[r, pos] = score[r, c]
                i = torch.zeros(rb, width, dtype=torch.long, device=x.device)
                i[r, pos] = c + c0
                v = None
                if signed:
                    v = z.new_zeros(rb, width)
                    v[r, pos] = z[r, c]
            best_s, best_v, best_i = _merge(best_s, best_v, best_i, s, v, i, min(k, have + s.shape[1]))
        vals = best_v if signed else best_s
        if out_v is None:
            out_v = vals.new_empty(B, k)
            out_i = best_i.new_empty(B, k)
        out_v[r0:r0 + rb] = vals
        out_i[r0:r0 + rb] = best_i
    return out_v, out_i


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, signed, chunk, path="chunked", rows=DEFAULT_ROWS):
        if path == "triton":
            from saelab.kernels.triton_topk import triton_select
            z_sel, idx = triton_select(x, W_enc, b_enc.contiguous(), k, signed)
        else:
            z_sel, idx = _chunked_select(x, W_enc, b_enc, k, signed, chunk, rows)
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
        return dx, dW, db, None, None, None, None, None


def topk_encode(x, W_enc, b_enc, k: int, signed: bool = False, kernel: str = "auto",
                chunk: int = DEFAULT_CHUNK, rows: int = DEFAULT_ROWS):
    """(values [B, k], indices [B, k]) of the TopK rule; see the module docstring."""
    path = resolve_kernel(kernel, x.device)
    if path == "reference":
        return topk_encode_reference(x, W_enc, b_enc, k, signed)
    return _TopKEncode.apply(x, W_enc, b_enc, k, signed, chunk, path, rows)
