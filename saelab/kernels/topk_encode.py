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
* ``screened`` (CPU, fp32): the chunked walk with the pre-activation screened in bf16 (x and a
  cached bf16 copy of W_enc), every latent whose screened score can still be in the top k under
  a rigorous per-row error bound kept as a candidate, the candidates rescored exactly in fp32,
  the exact top k taken among them (see ``_screened_select``; exact: same results as chunked).
  ``auto`` picks it over chunked on CPUs with native bf16 (``bf16_matmul_fast``) for fp32
  tensors with d_in·d_sae ≥ ``SCREEN_MIN_WEIGHTS`` while torch runs ≤ ``SCREEN_MAX_THREADS``
  threads (where it was measured to win); ``kernel="chunked"`` /
  ``SAELAB_KERNEL=chunked`` / ``--kernel chunked`` force the fp32 path. Other dtypes, autocast
  and CUDA run chunked even when screened is named.
* ``triton`` (CUDA tensors; CPU only under ``TRITON_INTERPRET=1``): ``triton_topk.py``, one kernel
  with a running top-k in registers.

The backward of both fused paths (``_TopKEncode``) needs only the forward's (values, indices) and
sends gradient only through the k selected entries:
  dW_enc[:, idx] += xᵀ·dvalues and dx = dvalues·W_enc[:, idx]ᵀ as products with a sparse
  [B, d_sae] matrix (never a dense gradient), db_enc by index_add.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.kernels.sparse_decode import half_in_fp32

KERNELS = ("auto", "reference", "chunked", "screened", "triton")
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
    return select(x @ W_enc + b_enc, k, signed)


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


# ---------------------------------------------------------------------------------------------
# screened: a bf16 screen of every latent, an exact fp32 rescoring of the few that can matter
# ---------------------------------------------------------------------------------------------
#
# Error bound of the screen (the derivation the candidate rule rests on). Write u = 2⁻⁸, the unit
# roundoff of bf16 (8 significand bits, round to nearest even). The screen rounds x and W_enc to
# bf16, x̃ = x − e_x and W̃ = W − e_W (e_x, e_W are exact in fp32: the dropped low bits), and the
# bias b̃ = b − e_b; it computes acc = x̃·W̃_j with fp32 accumulation (products of two bf16 are
# exact in fp32; oneDNN/cpublas accumulate in fp32), adds b̃ and rounds to bf16 once or twice
# (we do not rely on which: s = fl(fl(acc) + b̃) is the worse case). Per row i, latent j:
#   input rounding: x·W_j − x̃·W̃_j = e_x·W̃_j + x̃·e_W,j + e_x·e_W,j
#       ≤ ‖e_x‖ (Cw + Ce) + ‖x̃‖ Ce                   (Cauchy–Schwarz; Cw = maxⱼ‖W̃_j‖, Ce = maxⱼ‖e_W,j‖)
#   fp32 accumulation of d products (any order, FMA or not): |acc − x̃·W̃_j| ≤ γ_d ‖x̃‖ Cw,
#       γ_d = d·2⁻²⁴ / (1 − d·2⁻²⁴)
#   bias rounding: |e_b| ≤ max|e_b| (computed exactly)
#   output rounding: two round-to-nearest steps, each ≤ u × its result; bounded through the
#       screened value itself: ≤ ρ (|s| + max|b̃|), ρ = 2u / (1 − u)²
# so |s − z| ≤ A_i + ρ|s| with A_i = ‖e_x‖(Cw + Ce) + ‖x̃‖(Ce + γ_d Cw) + max|e_b| + ρ max|b̃|;
# for signed mode the same holds for ||s| − |z||. A safety factor SCREEN_SAFETY (2) multiplies
# A_i and ρ. The candidate rule: the screen's k best of row i, with screened k-th score t, have
# true scores ≥ lo(t) = t − A_i − ρ|t|, so the true k-th score T ≥ lo(t); a latent can be in the
# true top k only if hi(s_j) = s_j + A_i + ρ|s_j| ≥ lo(t). hi is increasing, so that is one
# per-row threshold θ_i = hi⁻¹(lo(t)): L = t − ρ|t| − 2A_i, θ = L / (1 + ρ) if L ≥ 0 else
# L / (1 − ρ). The running k-th screened score only grows over the chunks, so a threshold from
# it keeps a superset; at the end the candidates are cut to the final θ, rescored exactly in
# fp32 (torch.sparse.sampled_addmm: one dot product per candidate, no gathered copies) + b, and
# the exact top k taken among them. Rows with more than ``max_cand`` candidates are recomputed by
# the exact fp32 chunked path.
SCREEN_SAFETY = 2.0
SCREEN_U = 2.0 ** -8

_BF16_CACHE: dict = {}


def _bf16_weights(W: torch.Tensor, chunk: int):
    """(W̃ = bf16(W) contiguous, Cw = max column norm of W̃, Ce = max column norm of W − W̃),
    cached for this tensor object at this version (an optimizer step bumps ``_version``, so a
    training step converts once per step; the entry holds a weak reference, never a stale copy).
    The cache holds half of W_enc's memory while W_enc lives."""
    ent = _BF16_CACHE.get("W")
    if ent is not None and ent[0]() is W and ent[1] == (W._version, W.shape, W.stride(), W.data_ptr()):
        return ent[2]
    _BF16_CACHE.clear()
    Wq = W.to(torch.bfloat16).contiguous()
    cw = ce = 0.0
    for c0 in range(0, W.shape[1], chunk):  # column blocks: no fp32 temporary of W's size
        wq = Wq[:, c0:c0 + chunk].float()
        cw = max(cw, float(wq.norm(dim=0).max()))
        ce = max(ce, float((W[:, c0:c0 + chunk] - wq).norm(dim=0).max()))
    out = (Wq, cw, ce)
    _BF16_CACHE["W"] = (weakref.ref(W), (W._version, W.shape, W.stride(), W.data_ptr()), out)
    return out


def _witness_block(w: int, k: int) -> int:
    """Latents per witness: the largest of 32, 16, …, 1 leaving ≥ 4k witnesses in a chunk of w."""
    blk = 32
    while blk > 1 and w // blk < 4 * k:
        blk //= 2
    return blk


def _nonzero2d(mask):
    """(rows, cols) of a sparse bool [R, C] mask: nonzero over 8-byte words first, then over the
    bytes of the non-zero words only (about twice as fast as nonzero at ~1% density)."""
    R, C = mask.shape
    if C % 8 or not mask.is_contiguous():
        return mask.nonzero(as_tuple=True)
    rw, cw = mask.view(torch.int64).nonzero(as_tuple=True)
    j, bit = mask.view(R, C // 8, 8)[rw, cw].nonzero(as_tuple=True)
    return rw[j], cw[j] * 8 + bit


def _screen_threshold(t, A, rho):
    """θ = hi⁻¹(lo(t)) of the derivation above, per row; and a bf16 θ_q ≤ θ, so the per-chunk
    compare runs in bf16 (an fp32 threshold would promote the whole chunk to fp32) and keeps a
    superset: θ lowered by 2⁻⁷|θ| (≥ one bf16 ulp) then rounded to nearest stays ≤ θ."""
    L = t - rho * t.abs() - 2 * A
    theta = torch.where(L >= 0, L / (1 + rho), L / (1 - rho))
    theta_q = (theta - theta.abs() * 2.0 ** -7 - 1e-30).to(torch.bfloat16)
    return theta, theta_q


#: candidate statistics of the last screened call (benchmarks and tests read them)
SCREEN_STATS: dict = {}


@torch.no_grad()
def _screened_select(x, W_enc, b_enc, k: int, signed: bool, chunk: int, rows: int = DEFAULT_ROWS,
                     max_cand: int | None = None):
    """Same contract as ``_chunked_select`` (exact fp32 values and indices, best first), fp32 only."""
    B, d = x.shape
    n = W_enc.shape[1]
    if max_cand is None:  # a row's dot products cost more than its fp32 GEMM only past ~n/32 candidates;
        max_cand = max(4 * k, min(n // 16, 1024))  # the 1024 bounds the packs (≤ rows × 2·max_cand)
    Wq, cw, ce = _bf16_weights(W_enc, chunk)
    bq = b_enc.to(torch.bfloat16)
    e_b = float((b_enc - bq.float()).abs().max())
    bmax = float(bq.float().abs().max())
    u = SCREEN_U
    rho = 2 * u / (1 - u) ** 2
    gam = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    rho_s = SCREEN_SAFETY * rho
    out_v = torch.empty(B, k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(B, k, dtype=torch.long, device=x.device)
    stats = {"rows": B, "candidates": 0, "fallback_rows": 0, "max_per_row": 0}
    zbuf = torch.empty(min(rows, B) * min(chunk, n), dtype=torch.bfloat16, device=x.device)
    for r0 in range(0, B, rows):
        xb = x[r0:r0 + rows]
        rb = xb.shape[0]
        xq = xb.to(torch.bfloat16)
        xqf = xq.float()
        nx = xqf.norm(dim=1)
        nex = (xb - xqf).norm(dim=1)
        A = SCREEN_SAFETY * (nex * (cw + ce) + nx * (ce + gam * cw) + e_b + rho * bmax)  # [rb]
        best = None  # the k largest witnesses so far [rb, ≤ k] (fp32): a lower bound on the screened k-th
        theta = torch.full((rb,), float("-inf"), device=x.device)
        theta_q = theta.to(torch.bfloat16)
        cand = []  # per chunk: (c0, rows, local columns, screened scores)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            w = c1 - c0
            s = torch.addmm(bq[c0:c1], xq, Wq[:, c0:c1], out=zbuf[:rb * w].view(rb, w))
            if signed:
                s.abs_()
            si = s.view(torch.int16)
            # Running threshold without a top-k over the chunk: one witness per block of blk
            # latents (any element of the block: the int16 max of the bit patterns is the block's
            # largest non-negative value, else some element), so the k-th largest witness of k
            # distinct blocks is ≤ the screened k-th score — a valid lower bound, nearly tight
            # when blk is small next to chunk / k.
            blk = _witness_block(w, k)
            nb = w // blk
            wit = si[:, :nb * blk].reshape(rb, nb, blk).amax(-1)
            if nb * blk < w:
                wit = torch.cat([wit, si[:, nb * blk:].amax(-1, keepdim=True)], 1)
            wit = wit.view(torch.bfloat16).float()
            best = wit if best is None else torch.cat([best, wit], 1)
            best = best.topk(min(k, best.shape[1]), dim=-1).values
            if best.shape[1] == k:
                theta, theta_q = _screen_threshold(best[:, -1], A, rho_s)
            if bool((theta_q > 0).all()):  # positive bf16 compare like their int16 bit patterns
                mask = torch.ge(si, theta_q.view(torch.int16)[:, None])
            else:
                mask = torch.ge(s, theta_q[:, None])
            r, c = _nonzero2d(mask)  # row-major: rows ascending, columns ascending within a row
            if r.numel():
                cand.append((c0, r, c, s[r, c].float()))
        _rescore_block(xb, W_enc, b_enc, k, signed, cand, A, rho_s, max_cand, chunk, rows,
                       out_v[r0:r0 + rb], out_i[r0:r0 + rb], stats)
    SCREEN_STATS.clear()
    SCREEN_STATS.update(stats)
    return out_v, out_i


def _pack_positions(rq, cnt_q, offs):
    """Slots of this chunk's candidates (rows ascending) in a per-row packed layout after the
    ``offs`` entries each row already holds."""
    return offs[rq] + torch.arange(rq.numel(), device=rq.device) - (cnt_q.cumsum(0) - cnt_q)[rq]


def _rescore_block(xb, W_enc, b_enc, k, signed, cand, A, rho, max_cand, chunk, rows, out_v, out_i, stats):
    """One row block's end of ``_screened_select``: the final cut at the exact screened k-th,
    exact fp32 rescoring chunk by chunk, the exact top k; rows past the cap fall back."""
    rb, dev = xb.shape[0], xb.device
    total = sum(torch.bincount(r, minlength=rb) for _, r, _, _ in cand)
    pre_bad = total > 2 * max_cand  # far past the cap before the cut: no wide pack for these
    # the exact screened k-th of each row (its top k are among the candidates) → the final θ
    width = int(total.masked_fill(pre_bad, 0).max())
    theta = torch.full((rb,), float("inf"), device=dev)
    if width >= k:
        pack = torch.full((rb, width), float("-inf"), device=dev)
        offs = torch.zeros(rb, dtype=torch.long, device=dev)
        for _, r, _, sv in cand:
            ok = ~pre_bad[r]
            rq = r[ok]
            cnt_q = torch.bincount(rq, minlength=rb)
            pack[rq, _pack_positions(rq, cnt_q, offs)] = sv[ok]
            offs += cnt_q
        theta, _ = _screen_threshold(pack.topk(k, dim=-1).values[:, -1], A, rho)
        del pack
    keep = [(sv >= theta[r]) & ~pre_bad[r] for _, r, _, sv in cand]
    cnt = sum(torch.bincount(r[kq], minlength=rb) for (_, r, _, _), kq in zip(cand, keep))
    bad = pre_bad | (cnt > max_cand)
    stats["candidates"] += int(cnt.sum())
    stats["max_per_row"] = max(stats["max_per_row"], int(cnt.max()))
    if bool(bad.any()):  # too loose a screen for these rows: exact fp32 for them
        bad_rows = bad.nonzero().squeeze(1)
        out_v[bad_rows], out_i[bad_rows] = _chunked_select(xb[bad_rows], W_enc, b_enc, k, signed, chunk, rows)
        stats["fallback_rows"] += int(bad_rows.numel())
    width = int(cnt.masked_fill(bad, 0).max())
    if width < k:  # every row fell back
        return
    # exact scores of the candidates, chunk by chunk: sampled_addmm (one dot product per CSR
    # entry) against the chunk's columns transposed to contiguous rows (8 MiB at 4096 × 512;
    # given W's strided columns it would clone all of W per call)
    pz = torch.full((rb, width), float("-inf"), device=dev)
    pv = torch.zeros(rb, width, device=dev)
    pc = torch.zeros(rb, width, dtype=torch.long, device=dev)
    offs = torch.zeros(rb, dtype=torch.long, device=dev)
    for (c0, r, c, _), kq in zip(cand, keep):
        kq = kq & ~bad[r]
        rq, cq = r[kq], c[kq]
        if rq.numel() == 0:
            continue
        cnt_q = torch.bincount(rq, minlength=rb)
        crow = torch.zeros(rb + 1, dtype=torch.long, device=dev)
        crow[1:] = cnt_q.cumsum(0)
        w = min(chunk, W_enc.shape[1] - c0)
        wt = W_enc[:, c0:c0 + w].t().contiguous()
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cq, torch.zeros(rq.numel(), dtype=xb.dtype, device=dev),
                                              (rb, w), check_invariants=False)
        z = torch.sparse.sampled_addmm(pattern, xb, wt.t(), beta=0.0).values() + b_enc[c0 + cq]
        pos = _pack_positions(rq, cnt_q, offs)
        pz[rq, pos] = z.abs() if signed else z
        pv[rq, pos] = z
        pc[rq, pos] = cq + c0
        offs += cnt_q
    j = pz.topk(k, dim=-1).indices
    ok = (~bad).nonzero().squeeze(1)
    out_v[ok] = pv.gather(1, j)[ok].to(out_v.dtype)
    out_i[ok] = pc.gather(1, j)[ok]


def _screenable(x, W_enc, b_enc) -> bool:
    """The screen's bound is derived for fp32 inputs on CPU without autocast; anything else
    (fp64 gradchecks, bf16 tensors, autocast, CUDA) takes the exact chunked path."""
    return (x.dtype == W_enc.dtype == b_enc.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, signed, chunk, path="chunked", rows=DEFAULT_ROWS):
        if path == "triton":
            from saelab.kernels.triton_topk import triton_select
            z_sel, idx = triton_select(x, W_enc, b_enc.contiguous(), k, signed)
        elif path == "screened" and _screenable(x, W_enc, b_enc):
            z_sel, idx = _screened_select(x, W_enc, b_enc, k, signed, chunk, rows)
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
        w_dtype = W_enc.dtype
        if half_in_fp32(W_enc):  # no half sparse.mm on CUDA: the products in fp32, cast back below
            W_enc = W_enc.float()
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
            dW = torch.sparse.mm(S.t(), x.to(W_enc.dtype)).t().to(w_dtype)
        if ctx.needs_input_grad[2]:
            db = torch.zeros(n, dtype=dz.dtype, device=dz.device).index_add_(0, idx.flatten(), dz.flatten())
            db = db.to(w_dtype)
        return dx, dW, db, None, None, None, None, None


#: auto picks screened over chunked from this many encoder weights (d_in·d_sae) up: below it the
#: screen's bookkeeping outweighs its cheaper GEMM (measured: d_in 128 × 2048 trained demo SAE
#: 1.0–1.1× chunked's time; 512 × 8192 Gaussian 0.62×; see README "Kernels") ...
SCREEN_MIN_WEIGHTS = 1 << 22
#: ... and only while torch runs at most this many threads: single-threaded, screened measured
#: 0.50–0.57× chunked's forward and 0.50–0.63× its training step; with 2 threads on the (heavily
#: shared) 2-core machine its many small parallel ops lost to descheduled threads (forward 1.0×,
#: training step 1.6× chunked). On the quiet machine with 2 threads it won clearly (forward 0.62×
#: (16k) / 0.55× (64k) chunked's, training step 0.68× / 0.56×; README "Kernels"), so up to 2;
#: more threads are not measured.
SCREEN_MAX_THREADS = 2


@functools.lru_cache(maxsize=None)
def bf16_matmul_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX, through oneDNN): there a
    bf16 GEMM runs ~3.5× faster than fp32 (0.113 s vs 0.413 s at 4096×512×16384 here)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no probe, no screen by default
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _auto_screen(kernel: str, x, W_enc, b_enc) -> bool:
    """auto (no explicit kernel, no SAELAB_KERNEL) on a CPU with fast bf16, fp32, large enough,
    few enough threads (see SCREEN_MIN_WEIGHTS, SCREEN_MAX_THREADS)."""
    env = os.environ.get("SAELAB_KERNEL", "").strip()
    return (kernel == "auto" and env in ("", "auto") and _screenable(x, W_enc, b_enc)
            and W_enc.numel() >= SCREEN_MIN_WEIGHTS and torch.get_num_threads() <= SCREEN_MAX_THREADS
            and bf16_matmul_fast())


def topk_encode(x, W_enc, b_enc, k: int, signed: bool = False, kernel: str = "auto",
                chunk: int = DEFAULT_CHUNK, rows: int = DEFAULT_ROWS):
    """(values [B, k], indices [B, k]) of the TopK rule; see the module docstring."""
    if x.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise SaelabError(f"topk_encode: x has shape {list(x.shape)}, but W_enc [{W_enc.shape[0]}, {W_enc.shape[1]}] "
                          f"needs rows of d_in {W_enc.shape[0]}: pass x shaped [batch, {W_enc.shape[0]}]")
    path = resolve_kernel(kernel, x.device)
    if path == "chunked" and _auto_screen(kernel, x, W_enc, b_enc):
        path = "screened"
    if path == "reference":
        return topk_encode_reference(x, W_enc, b_enc, k, signed)
    return _TopKEncode.apply(x, W_enc, b_enc, k, signed, chunk, path, rows)
