"""The Triton TopK encode: ``triton_select(x, W_enc, b_enc, k, signed) -> (z_sel [B, k], idx [B, k])``.

Imported only where it can run: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the
tests). ``topk_encode`` applies the ReLU and the sparse backward; this module only selects.

Design: **single-stage running top-k**, with an optional split of the latent dimension. Each
program owns ``BLOCK_B`` rows and one contiguous range of latents. It walks that range in tiles of
``BLOCK_N`` latents; per tile it computes the pre-activations with ``tl.dot`` (``x`` and ``W_enc``
in their own dtype — bf16/fp16/fp32 — accumulated in fp32, plus ``b_enc``; under the interpreter
the tiles are upcast first: its bf16 ``tl.dot`` returns garbage, and bf16 products are exact in
fp32, so the result is the same) and merges them into a running top-k held in registers
(``[BLOCK_B, K_PAD]`` values and indices). The merge is rounds of ``max``/``argmax``: while some
row's tile maximum beats that row's running k-th score, that element replaces the running minimum
and is masked out of the tile. The first tile costs k rounds; after it a tile needs only as many
rounds as the most any row of the block gains from it (on random data about k·BLOCK_N/d_sae per
row), so the selection costs little next to the GEMM. (``tl.sort``/``tl.topk`` would be the other
way; they cost a full bitonic sort per tile, and are far slower under the interpreter the tests
use.)

Why not two-stage (per-tile top-k to global memory, then a torch merge): it writes
B·k·d_sae/BLOCK_N candidates — with k=32 and BLOCK_N=128 a quarter of the dense pre-activation
the kernel exists to avoid. Single-stage writes B·k per latent split. Splitting the latents
over ``n_split`` programs per row block (each writes its own running top-k; a small
``torch.topk`` over n_split·k candidates merges them) only exists to fill the GPU when
B/BLOCK_B row blocks are fewer than its SMs; ``n_split=1`` is the pure single-stage kernel.

``signed=True`` (AbsTopK) ranks by |z| and returns z with its sign.

**The threshold method** (``method="threshold"``, or ``SAELAB_TRITON_METHOD=threshold``; opt-in,
for the reason at the end of this paragraph; ``benchmarks/tune_triton.py`` times both methods). Two
passes of the same tiles, the same code, so the same z: pass 0 stores each row's maximum per tile
(B·d_sae/BLOCK_N floats, 1/128 of the dense pre-activation); ``torch.topk`` takes each row's k-th
best tile maximum as its threshold; k distinct tiles hold a score at least that large, so every
top-k entry does too. Pass 1 appends each entry at or above its row's threshold to a candidate list
per row and program (``cap`` = 8k slots each), in rounds that take every row's best remaining
candidate of the tile; one ``torch.topk`` over the lists selects. On random scores a row has few
more than k candidates, so a tile needs about one round, where the running method needs as many as
its running top-k gains. Rows with more than ``cap`` candidates in one list (ties, structured
scores) or fewer than k in all (never, unless the passes' rounding differed) are computed from the
dense product of those rows alone. It stays opt-in because that fallback is dense: scores with many
near-ties across tiles would make it a dense GEMM, which the running method never is. With fewer
than k tiles of latents the threshold bounds nothing, and the running method runs instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _sm_count(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU (1 under the interpreter): how many programs fill it."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


@triton.jit
def _tile_z(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_xb, stride_xd, stride_wd, stride_wn,
            DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN: tl.constexpr = False):
    """One tile's pre-activations z = x[rows] · W_enc[:, cols] + b_enc[cols], accumulated in fp32.
    EVEN: B, d_sae and d_in are multiples of the tile sides, so the loads need no masks (unmasked
    loads are the cheaper ones; the threshold method's passes use them)."""
    dcols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dcols
        if EVEN:
            xt = tl.load(x_ptr + rows[:, None] * stride_xb + dd[None, :] * stride_xd)
            wt = tl.load(w_ptr + dd[:, None] * stride_wd + cols[None, :] * stride_wn)
        else:
            xt = tl.load(x_ptr + rows[:, None] * stride_xb + dd[None, :] * stride_xd,
                         mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
            wt = tl.load(w_ptr + dd[:, None] * stride_wd + cols[None, :] * stride_wn,
                         mask=(dd[:, None] < D) & col_ok[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong; bf16 products are exact in fp32
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc=acc, input_precision=PRECISION)
    return acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _topk_encode_kernel(x_ptr, w_ptr, b_ptr, val_ptr, idx_ptr,
                        B, D, N, n_per_split,
                        stride_xb, stride_xd, stride_wd, stride_wn,
                        K: tl.constexpr, K_PAD: tl.constexpr, SIGNED: tl.constexpr, DOT_FP32: tl.constexpr,
                        PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    kcols = tl.arange(0, K_PAD)
    # running top-k: padded slots hold +inf so they are never the minimum that gets replaced
    run_s = tl.where(kcols[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_B, K_PAD], tl.float32)
    run_v = tl.zeros([BLOCK_B, K_PAD], tl.float32) + (0.0 if SIGNED else float("-inf"))  # unfilled: never merged
    run_i = tl.zeros([BLOCK_B, K_PAD], tl.int32)
    run_min, run_pos = tl.min(run_s, axis=1, return_indices=True)

    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        z = _tile_z(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_xb, stride_xd, stride_wd, stride_wn,
                    DOT_FP32, PRECISION, BLOCK_B, BLOCK_N, BLOCK_D)
        score = tl.abs(z) if SIGNED else z
        score = tl.where(col_ok[None, :], score, float("-inf"))
        t_max, t_arg = tl.max(score, axis=1, return_indices=True)
        # merge rounds: each row whose best remaining tile score beats its running k-th swaps it in
        while tl.max((t_max > run_min).to(tl.int32), axis=0) > 0:
            take = t_max > run_min
            hit = cols[None, :] == (n0 + t_arg)[:, None]
            t_val = tl.sum(tl.where(hit, z, 0.0), axis=1)
            slot = take[:, None] & (kcols[None, :] == run_pos[:, None])
            run_s = tl.where(slot, t_max[:, None], run_s)
            run_v = tl.where(slot, t_val[:, None], run_v)
            run_i = tl.where(slot, (n0 + t_arg)[:, None], run_i)
            score = tl.where(hit & take[:, None], float("-inf"), score)
            run_min, run_pos = tl.min(run_s, axis=1, return_indices=True)
            t_max, t_arg = tl.max(score, axis=1, return_indices=True)

    out = (rows[:, None] * n_splits + pid_s) * K + kcols[None, :]
    ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(val_ptr + out, run_v, mask=ok)
    tl.store(idx_ptr + out, run_i.to(tl.int64), mask=ok)


@triton.jit
def _tile_pass_kernel(x_ptr, w_ptr, b_ptr, tmax_ptr, thr_ptr, cnt_ptr, cv_ptr, ci_ptr,
                      B, D, N, n_tiles, tiles_per_prog, CAP,
                      stride_xb, stride_xd, stride_wd, stride_wn,
                      SIGNED: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, PASS: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      EVEN: tl.constexpr):
    """The threshold method's two passes over the same tiles (the same code, so the same z):
    PASS 0 stores each row's maximum score per tile; PASS 1 appends every entry whose score is at least
    its row's threshold to the row's candidate list of this program (at most CAP kept; the count goes on
    past CAP so the caller sees the overflow). It appends in rounds: each takes every row's best
    remaining candidate of the tile, so a tile costs as many rounds as its busiest row has candidates
    (about one on random scores). Each program owns its lists, so appending needs no atomics (a
    list shared per row would need one per candidate)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    if PASS == 1:
        thr = tl.load(thr_ptr + rows, mask=row_ok, other=float("inf"))
    n_got = tl.zeros([BLOCK_B], tl.int32)  # PASS 1: candidates this program found per row
    t_lo = pid_n * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, n_tiles)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        z = _tile_z(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_xb, stride_xd, stride_wd, stride_wn,
                    DOT_FP32, PRECISION, BLOCK_B, BLOCK_N, BLOCK_D, EVEN)
        score = tl.abs(z) if SIGNED else z
        score = tl.where(col_ok[None, :], score, float("-inf"))
        if PASS == 0:
            tl.store(tmax_ptr + rows * n_tiles + t, tl.max(score, axis=1), mask=row_ok)
        else:
            t_max, t_arg = tl.max(score, axis=1, return_indices=True)
            while tl.max((t_max >= thr).to(tl.int32), axis=0) > 0:
                take = t_max >= thr
                hit = tl.arange(0, BLOCK_N)[None, :] == t_arg[:, None]
                out = (rows * tl.num_programs(1) + pid_n) * CAP + n_got
                ok = take & (n_got < CAP)
                tl.store(cv_ptr + out, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=ok)
                tl.store(ci_ptr + out, t * BLOCK_N + t_arg, mask=ok)
                n_got += take.to(tl.int32)
                score = tl.where(hit & take[:, None], float("-inf"), score)
                t_max, t_arg = tl.max(score, axis=1, return_indices=True)
    if PASS == 1:
        tl.store(cnt_ptr + rows * tl.num_programs(1) + pid_n, n_got, mask=row_ok)


def _threshold_select(x, W_enc, b_enc, k: int, signed: bool, block_b: int, block_n: int, block_d: int,
                      launch: dict, precision: str, n_progs: int | None = None, cap: int | None = None,
                      prog_target: int = 2, passes: int = 2):
    """The threshold method (see the module docstring): (z_sel [B, k] fp32, idx [B, k] int64), best first.
    n_progs: programs per row block (default: about prog_target per SM); passes=1 runs pass 0 alone and
    returns the tile maxima [B, n_tiles] (tune_triton.py times the bare GEMM with it)."""
    B, D = x.shape
    N = W_enc.shape[1]
    n_tiles = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(B, block_b)
    if n_progs is None:  # programs per row block: enough to fill the GPU prog_target times (interpreter: 2)
        n_progs = max(1, min(n_tiles, triton.cdiv(prog_target * _sm_count(x), row_blocks)))
    per = triton.cdiv(n_tiles, n_progs)
    grid = (row_blocks, triton.cdiv(n_tiles, per))
    cap = max(cap or 8 * k, k)  # per program's list: at least k, so the final top-k always has k slots
    common = (B, D, N, n_tiles, per, cap, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1))
    even = B % block_b == 0 and N % block_n == 0 and D % block_d == 0
    consts = dict(SIGNED=signed, DOT_FP32=not x.is_cuda, PRECISION=precision, BLOCK_B=block_b, BLOCK_N=block_n,
                  BLOCK_D=block_d, EVEN=even, **launch)
    tmax = torch.empty(B, n_tiles, dtype=torch.float32, device=x.device)
    _tile_pass_kernel[grid](x, W_enc, b_enc, tmax, tmax, tmax, tmax, tmax, *common, PASS=0, **consts)
    if passes == 1:
        return tmax
    # k distinct tiles hold a score >= each row's k-th best tile maximum: every top-k entry is >= it
    thr = tmax.topk(k, dim=1).values[:, k - 1].contiguous()
    lists = grid[1]  # one list per program of a row block
    cnt = torch.zeros(B, lists, dtype=torch.int32, device=x.device)
    cv = torch.empty(B, lists, cap, dtype=torch.float32, device=x.device)
    ci = torch.empty(B, lists, cap, dtype=torch.int32, device=x.device)
    _tile_pass_kernel[grid](x, W_enc, b_enc, tmax, thr, cnt, cv, ci, *common, PASS=1, **consts)
    filled = torch.arange(cap, device=x.device) < cnt[:, :, None]
    score = torch.where(filled, cv.abs() if signed else cv, float("-inf")).view(B, lists * cap)
    j = score.topk(k, dim=1).indices
    vals, idx = cv.view(B, -1).gather(1, j), ci.view(B, -1).gather(1, j).long()
    # rows with more candidates than a list holds (ties at the threshold, or structured scores) or,
    # should rounding ever differ between the passes, fewer than k: those rows from the dense product
    bad = ((cnt > cap).any(1) | (cnt.sum(1) < k)).nonzero().flatten()
    if bad.numel():
        z = torch.addmm(b_enc.float(), x[bad].float(), W_enc.float())
        jb = (z.abs() if signed else z).topk(k, dim=1).indices
        vals[bad], idx[bad] = z.gather(1, jb), jb
    return vals, idx


def triton_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, signed: bool = False,
                  *, block_b: int | None = None, block_n: int | None = None, block_d: int | None = None,
                  n_split: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  split_target: int | None = None, method: str | None = None):
    """(pre-activation values [B, k] in x's dtype, indices [B, k] int64) of the k best latents,
    best first. method: "running" (the default) or "threshold" (module docstring; the one with fewer
    than k tiles of latents falls back to running)."""
    B, D = x.shape
    N = W_enc.shape[1]
    method = method or os.environ.get("SAELAB_TRITON_METHOD", "running")
    if method not in ("running", "threshold"):
        raise ValueError(f"unknown Triton select method {method!r} (running or threshold)")
    gpu = x.is_cuda
    block_b = block_b or (64 if gpu else 32)  # small tiles for the interpreter (its cost grows with them)
    block_n = block_n or (128 if gpu else 64)
    block_d = block_d or (64 if gpu else 32)
    threshold = method == "threshold" and triton.cdiv(N, block_n) >= k
    # on the GPU, each method's default launch is the fastest setting benchmarks/tune_triton.py finds at
    # the bf16 benchmark shape: both 64 × 128 × 64 tiles and 4 warps; running: 4 stages, latent splits
    # for about one program per SM; threshold: 3 stages, about two programs per SM
    if gpu:
        num_warps, num_stages = num_warps or 4, num_stages or (3 if threshold else 4)
    # the interpreter: 2 keeps the split path (several programs per row block) in its tests
    split_target = split_target or (1 if gpu and not threshold else 2)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):  # bf16/fp16 tensor cores, as autocast's matmul
        x = x.to(torch.get_autocast_dtype("cuda"))
    if W_enc.dtype != x.dtype:
        W_enc = W_enc.to(x.dtype)
    launch = {**({"num_warps": num_warps} if num_warps else {}), **({"num_stages": num_stages} if num_stages else {})}
    # fp32 inputs: full fp32 products unless torch itself allows TF32 (the reference's GEMM)
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if threshold:
        vals, idx = _threshold_select(x, W_enc, b_enc, k, signed, block_b, block_n, block_d, launch, precision,
                                      n_progs=n_split, prog_target=split_target)
        return vals.to(x.dtype), idx
    row_blocks = triton.cdiv(B, block_b)
    if n_split is None:  # enough programs to fill the GPU (interpreter: 1)
        n_split = max(1, min(triton.cdiv(split_target * _sm_count(x), row_blocks), triton.cdiv(N, 4 * block_n)))
    per = triton.cdiv(max(triton.cdiv(N, n_split), k), block_n) * block_n  # each split holds ≥ k latents
    n_split = triton.cdiv(N, per)
    vals = torch.empty(B, n_split, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(B, n_split, k, dtype=torch.int64, device=x.device)
    _topk_encode_kernel[(row_blocks, n_split)](
        x, W_enc, b_enc, vals, idx, B, D, N, per,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        K=k, K_PAD=triton.next_power_of_2(k), SIGNED=signed, DOT_FP32=not x.is_cuda, PRECISION=precision,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, **launch)
    vals, idx = vals.view(B, n_split * k), idx.view(B, n_split * k)
    # merge the splits (if any) and order best first, as the other paths do: a [B, n_split·k] topk
    j = (vals.abs() if signed else vals).topk(k, dim=-1).indices
    return vals.gather(-1, j).to(x.dtype), idx.gather(-1, j)
