"""The screened TopK encode (``screened_select``, CPU, fp32): a bf16 screen of every latent, an
exact fp32 rescoring of the few that can matter.

The chunked walk with the pre-activation screened in bf16 (x and a cached bf16 copy of W_enc);
every latent whose screened score can still be in the top k under a rigorous per-row error bound
(derived below) is kept as a candidate, the candidates are rescored exactly in fp32 and the exact
top k taken among them: the same results as ``chunked_select``, which also computes the rows whose
candidates exceed the cap.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from saelab.kernels.chunked import DEFAULT_ROWS, chunked_select

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
    bytes of the non-zero words only (on a sparse mask most words are zero, so the second pass is small)."""
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
def screened_select(x, W_enc, b_enc, k: int, signed: bool, chunk: int, rows: int = DEFAULT_ROWS,
                    max_cand: int | None = None):
    """Same contract as ``chunked_select`` (exact fp32 values and indices, best first), fp32 only."""
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
    """One row block's end of ``screened_select``: the final cut at the exact screened k-th,
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
        out_v[bad_rows], out_i[bad_rows] = chunked_select(xb[bad_rows], W_enc, b_enc, k, signed, chunk, rows)
        stats["fallback_rows"] += int(bad_rows.numel())
    width = int(cnt.masked_fill(bad, 0).max())
    if width < k:  # every row fell back
        return
    # exact scores of the candidates, chunk by chunk: sampled_addmm (one dot product per CSR
    # entry) against the chunk's columns transposed to contiguous rows (a copy of one chunk;
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

