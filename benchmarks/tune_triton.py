"""Sweep the Triton TopK encode's tiles and launch settings, and profile one TopK training step per path.

GPU only (a session lent a GPU machine runs it in one call; ``--small`` dry-runs it on the CPU under
``TRITON_INTERPRET=1``):

    python benchmarks/tune_triton.py [--budget 120] [--reps 10]

1. Forward: every (method, BLOCK_B, BLOCK_N, BLOCK_D, num_warps, num_stages, split target) in the grid below at
   the issue's shape (bf16, B 4096, d_in 768, d_sae 32768, k 32), timed with CUDA events (median of
   --reps), each checked against an exact float64 top-k (the share of clear rows whose index sets
   agree: a fast but wrong tile is not a winner), until --budget seconds are spent. The reference
   (``torch.topk`` of the cuBLAS pre-activation) is timed in the same run; the table is sorted by
   time and prints the speed-up over it. For the threshold method it also times pass 0 alone (the
   tiles' products and their row maxima: its bare GEMM), against cuBLAS's product of the same shape.
2. The training step (loss + backward) of a bf16 TopK SAE per path under ``torch.profiler``: the
   top CUDA ops, so the backward's cost is seen by op.

Writes ``benchmarks/results/tune_triton.json`` (``results.py``; ``tune_triton_small.json`` with ``--small``):
the forward table and the training-step times (the profiles are printed only).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from bench_encode import train_step
from results import Result
from saelab.kernels.reference import topk_encode_reference
from saelab.kernels.triton_topk import _threshold_select, triton_select
from saelab.sae import SAE


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn (CUDA events on the GPU, wall clock otherwise), after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        if torch.cuda.is_available():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _select_kwargs(cfg: tuple) -> dict:
    """triton_select's keywords for one grid entry (method, BLOCK_B, BLOCK_N, BLOCK_D, warps, stages, split target)."""
    m, bb, bn, bd, w, st, t = cfg
    return dict(block_b=bb, block_n=bn, block_d=bd, num_warps=w, num_stages=st, method=m, split_target=t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=120, help="seconds for the forward sweep")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--small", action="store_true", help="tiny shape and grid (CPU dry run under the interpreter)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled training steps")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = Result("tune_triton_small" if a.small else "tune_triton", "Triton TopK encode: launch settings swept",
                 "Every (method, BLOCK_B, BLOCK_N, BLOCK_D, num_warps, num_stages, split target) of the grid, timed "
                 "with CUDA events (median), each checked against an exact float64 top-k (the share of clear rows "
                 "whose index sets agree), against the reference (`torch.topk` of the cuBLAS pre-activation) timed "
                 "in the same run; for the threshold method also its pass 0 alone (the tiles' products and row "
                 "maxima) against cuBLAS's product of the same shape. Then one TopK training step (loss + backward) "
                 "per path, timed and profiled (the profiles are printed, not stored).",
                 device=f"cuda: {torch.cuda.get_device_name()}" if dev == "cuda" else "cpu")
    B, d, n, k = (96, 32, 512, 8) if a.small else (4096, 768, 32768, 32)
    dtype = torch.float32 if a.small else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, d, generator=g, device=dev).to(dtype)
    W = (torch.randn(d, n, generator=g, device=dev) / d**0.5).to(dtype)
    b = (torch.randn(n, generator=g, device=dev) * 0.1).to(dtype)
    z = x.double() @ W.double() + b.double()
    ranked = z.topk(k + 1, dim=-1)
    clear = (ranked.values[:, k - 1] - ranked.values[:, k]) > 2e-3
    exact = ranked.indices[:, :k].sort(-1).values
    del z, ranked

    ref_ms = timed(lambda: topk_encode_reference(x, W, b, k), a.reps)
    mm_ms = timed(lambda: torch.mm(x, W), a.reps)
    # (method, BLOCK_B, BLOCK_N, BLOCK_D, warps, stages, split target). The threshold method's sweeps on an
    # H200 (2026-11-30), each with the reference (1.67-1.68 ms) and the running method (1.83 ms) in the run:
    # as first written (one acq_rel atomic per candidate into a shared per-row list) 2.41 ms at best of 32
    # settings; with unmasked loads when the shape divides the tiles, 2.10; with relaxed atomics, 1.94; with
    # the candidates appended in rounds into a list per program (no atomics), 1.74 (64x128x64, 4 warps,
    # 3 stages, split target 2), faster in all 8 settings timed both ways. Its pass 0 alone (the bare GEMM
    # and row maxima) took 0.53-0.60 ms at 64x128 tiles and 0.43 ms at 128x256 (cuBLAS: 0.29-0.30 ms), but
    # 128x256 tiles made pass 1 slow (2.6 ms in all, atomic appends). Not kept: the tile loop flattened into
    # the d_in loop (tl.range(flatten=True): did not compile on Triton 3.6); one atomic per row and a scan
    # for the slots (2.28 ms at best).
    tiles = [(64, 128, 64, 4), (128, 128, 64, 8)]
    grid = ([("threshold", 32, 64, 32, 4, 2, 2), ("running", 32, 64, 32, 4, 2, 2)] if a.small else
            [("threshold", bb, bn, bd, w, st, t) for (bb, bn, bd, w), st, t in itertools.product(tiles, [3, 4], [1, 2])]
            + [("running", 64, 128, 64, 4, 4, 1)])
    rows = []
    t_end = time.perf_counter() + a.budget
    for cfg in grid:
        if time.perf_counter() > t_end:
            print(f"(sweep stopped at its {a.budget:.0f} s budget after {len(rows)} of {len(grid)} configs)")
            break
        m, bb, bn, bd, w, st, t = cfg
        kw = _select_kwargs(cfg)
        try:
            _, i = triton_select(x, W, b, k, **kw)
            agree = (i.sort(-1).values == exact).all(-1)[clear].float().mean().item()
            ms = timed(lambda: triton_select(x, W, b, k, **kw), a.reps)
            p0 = (timed(lambda: _threshold_select(x, W, b, k, False, bb, bn, bd, dict(num_warps=w, num_stages=st),
                                                  "ieee", prog_target=t, passes=1), a.reps)
                  if m == "threshold" else float("nan"))
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory, registers)
            print(f"{cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        rows.append((ms, cfg, agree, p0))
    tab = res.table(f"Forward, {dev}, B={B} d_in={d} d_sae={n} k={k} {dtype}, sorted by time",
                    ["method", "BLOCK_B", "BLOCK_N", "BLOCK_D", "warps", "stages", "split target", "ms",
                     "speed-up vs reference", "agree", "pass 0 ms", "pass 0 / GEMM"],
                    note=f"torch {torch.__version__}; reference {ref_ms:.3f} ms (its GEMM alone {mm_ms:.3f} ms); "
                         f"clear rows {clear.float().mean().item():.2f}; medians of {a.reps}",
                    fmt={"ms": ".3f", "speed-up vs reference": ".2f", "agree": ".4f", "pass 0 ms": ".3f",
                         "pass 0 / GEMM": ".2f"})
    for ms, cfg, agree, p0 in sorted(rows, key=lambda r: r[0]):
        tab.row(*cfg, ms, ref_ms / ms, agree, p0, p0 / mm_ms)
    tab.close()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    best = [r for r in sorted(rows, key=lambda r: r[0]) if r[1][0] == "threshold"][:1]
    for ms, cfg, _, _ in best:  # where the fastest threshold setting's time goes, by kernel
        kw = _select_kwargs(cfg)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                triton_select(x, W, b, k, **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
        print(f"\nthe fastest threshold setting {cfg} ({ms:.3f} ms), 5 calls profiled:")
        print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=60))
    if a.no_profile:
        res.write()
        return

    # 2. where a training step's time goes, per path
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=d, d_sae=n, k=k).to(dev).to(dtype)
    xs = torch.randn(B, d, device=dev, dtype=dtype)
    steps = {}
    for path in (["reference", "chunked"] if a.small else ["reference", "triton", "triton threshold"]):
        step = train_step(sae, xs, path)
        steps[path] = timed(step, a.reps)
        with torch.profiler.profile(activities=acts) as prof:
            step()
            if dev == "cuda":
                torch.cuda.synchronize()
        print(f"\ntraining step, {path}: {steps[path]:.3f} ms")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
    tab = res.table(f"TopK training step (loss + backward), {dev}, {dtype}", ["path", "step ms", "speed-up vs reference"],
                    note=f"B={B} d_in={d} d_sae={n} k={k}; medians of {a.reps}",
                    fmt={"step ms": ".3f", "speed-up vs reference": ".2f"})
    for path, ms in steps.items():
        tab.row(path, ms, steps["reference"] / ms)
    res.write()


if __name__ == "__main__":
    main()
