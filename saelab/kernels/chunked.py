"""The chunked TopK encode (``chunked_select``): the exact path in the tensors' own dtype (or
autocast's), auto's choice on CPU and on CUDA without triton.

Rows in blocks of ``rows``, the latent dimension in chunks of ``chunk``; one ``addmm`` per block,
merged into a running top-k, where after the first chunk only entries above the running k-th
score are candidates. Peak extra memory O(rows·chunk) instead of O(B·d_sae). Values come best
first. ``screened.py`` falls back to it for the rows its screen cannot settle.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096
DEFAULT_ROWS = 4096


def _merge(best_s, best_v, best_i, s, v, i, k: int):
    """Running top-k: the k best of the kept and the new candidates (sorted, best first)."""
    if best_s is None:
        return s, v, i
    cat_s = torch.cat([best_s, s], dim=1)
    s2, j = cat_s.topk(k, dim=-1)
    v2 = s2 if v is None else torch.cat([best_v, v], dim=1).gather(-1, j)
    return s2, v2, torch.cat([best_i, i], dim=1).gather(-1, j)


@torch.no_grad()
def chunked_select(x, W_enc, b_enc, k: int, signed: bool, chunk: int, rows: int = DEFAULT_ROWS):
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
            return chunked_select(x.to(dtype), W_enc.to(dtype), b_enc.to(dtype), k, signed, chunk, rows)
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
