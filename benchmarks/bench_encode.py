"""Fused TopK encode vs the reference, as ratios measured in one run (the machine may be shared).

    python benchmarks/bench_encode.py [--widths 16384,65536] [--reps 3] [--threads 0] [--gpu-only]

1. CPU forward (B=4096, d_in=512, k=32): chunked and screened vs reference wall time (variants
   alternated, medians), with the bare encoder GEMM (fp32: chunked's floor; bf16: the screen's)
   and the screened path's candidates per row (random Gaussian inputs and weights).
2. CPU peak extra memory of the forward: each variant in its own subprocess; its peak RSS
   (VmHWM, reset once the inputs are allocated) minus its RSS at that point.
3. CPU training step of a TopK SAE (loss + backward): fused (chunked or screened encode, sparse
   decode, sparse backward) vs reference (dense), time ratio.
4. GPU (only when CUDA is present): Triton and the chunked torch path vs reference, bf16, d_in=768,
   d_sae=32768, k=32: forward time, peak allocated memory, TopK training step time. Skipped (and said
   so) otherwise; ``--gpu-only`` runs only this section (benchmarks/device_check.sh).

Writes ``benchmarks/results/bench_encode.json`` (``results.py``; ``bench_encode_gpu.json`` with ``--gpu-only``).
"""

import argparse
import json
import os
import statistics
import time

import torch

from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes, run_child
from results import Result
from saelab.kernels import topk_encode
from saelab.sae import SAE

FUSED = ("chunked", "screened")


def inputs(B, d, n, dtype=torch.float32, device="cpu"):
    """Filled in place, so no temporary raises the peak RSS above the inputs themselves."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.empty(B, d, dtype=dtype, device=device).normal_(generator=g)
    W = torch.empty(d, n, dtype=dtype, device=device).normal_(std=d**-0.5, generator=g)
    b = torch.empty(n, dtype=dtype, device=device).normal_(std=0.1, generator=g)
    return x, W, b


def alternate(variants: dict, reps: int, sync=lambda: None) -> dict:
    """Median seconds per variant, running the variants in turn (one warm-up each first)."""
    for fn in variants.values():
        fn()
    sync()
    ts = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            sync()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def use_path(name: str) -> str:
    """The kernel name of a benchmark path, with the Triton select method set for it ("triton threshold":
    the Triton kernel's threshold method, through SAELAB_TRITON_METHOD; any other path: the default)."""
    os.environ["SAELAB_TRITON_METHOD"] = "threshold" if name.endswith("threshold") else "running"
    return name.split()[0]


def train_step(sae, xs, kernel):
    """One TopK training step's compute (loss + backward) with the given encode path (``use_path``), as a
    callable."""
    def fn():
        sae.kernel = use_path(kernel)
        sae.loss(xs)["loss"].backward()
        sae.zero_grad(set_to_none=True)
    return fn


def mem_child(kernel: str, width: int, B: int, d: int, k: int) -> None:
    """Subprocess body: print the peak RSS growth of one forward over the allocated inputs."""
    x, W, b = inputs(B, d, width)
    reset_peak_rss()
    base = rss_bytes()
    with torch.no_grad():
        topk_encode(x, W, b, k, kernel=kernel)
    peak = peak_rss_bytes()
    print(json.dumps({"extra": peak - base}))


def measure_mem(kernel, width, a) -> int:
    return run_child([__file__, "--mem-child", kernel, "--widths", str(width), "--batch", str(a.batch),
                      "--d-in", str(a.d_in), "--k", str(a.k)])["extra"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="16384,65536")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--gpu-only", action="store_true", help="only section 4 (the GPU); benchmarks/device_check.sh")
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mem_child:
        return mem_child(a.mem_child, widths[0], a.batch, a.d_in, a.k)
    res = Result("bench_encode_gpu" if a.gpu_only else "bench_encode", "Fused TopK encode vs the reference",
                 DESCRIPTION)
    if not a.gpu_only:
        cpu_sections(a, widths, res)
    gpu_section(a, res)
    res.write()


DESCRIPTION = (
    "The TopK encode paths (`saelab.kernels.topk_encode`) against the reference (`torch.topk` of the full "
    "pre-activation), all timed in the same run with the variants alternated (medians). CPU, on random Gaussian "
    "inputs and weights: forward wall time, with the bare encoder GEMM as each fused path's floor (fp32 for "
    "chunked, bf16 for screened's screen) and the screened path's candidates per row; the peak extra memory of "
    "one forward, each path in its own subprocess (peak RSS, reset once the inputs are allocated, minus the RSS "
    "at that point); and a TopK SAE training step (loss + backward). GPU (only where CUDA is present): Triton "
    "and the chunked torch path vs the reference in bf16: forward time, peak allocated memory, training step.")


def cpu_sections(a, widths, res):
    """Sections 1-3: forward time, peak memory, training step on this CPU."""
    t = res.table("CPU: forward, peak memory and training step per path",
                  ["d_sae", "path", "forward ms", "forward / reference", "floor: GEMM / reference",
                   "candidates / row", "peak extra MiB", "memory / reference", "train step ms", "step / reference"],
                  fmt={"forward ms": ".0f", "forward / reference": ".2f", "floor: GEMM / reference": ".2f",
                       "candidates / row": ".0f", "peak extra MiB": ".0f", "memory / reference": ".3f",
                       "train step ms": ".0f", "step / reference": ".2f"})
    fallback = []
    for n in widths:
        x, W, b = inputs(a.batch, a.d_in, n)
        xq, Wq = x.bfloat16(), W.bfloat16()
        with torch.no_grad():
            tm = alternate({"gemm": lambda: x @ W, "gemm_bf16": lambda: xq @ Wq,
                            "reference": lambda: topk_encode(x, W, b, a.k, kernel="reference"),
                            **{f: (lambda f=f: topk_encode(x, W, b, a.k, kernel=f)) for f in FUSED}}, a.reps)
            topk_encode(x, W, b, a.k, kernel="screened")
            from saelab.kernels.screened import SCREEN_STATS
            cand = dict(SCREEN_STATS)
        del x, W, b, xq, Wq
        mem = {kern: measure_mem(kern, n, a) for kern in ("reference", *FUSED)}
        torch.manual_seed(0)
        sae = SAE.create("topk", d_in=a.d_in, d_sae=n, k=a.k)
        xs = torch.randn(a.batch, a.d_in)
        ts = alternate({kern: train_step(sae, xs, kern) for kern in ("reference", *FUSED)}, a.reps)
        del sae
        floor = {"reference": None, "chunked": tm["gemm"] / tm["reference"],
                 "screened": tm["gemm_bf16"] / tm["reference"]}
        for path in ("reference", *FUSED):
            t.row(n, path, tm[path] * 1e3, tm[path] / tm["reference"], floor[path],
                  cand["candidates"] / cand["rows"] if path == "screened" else None, mem[path] / 2**20,
                  mem[path] / max(mem["reference"], 1), ts[path] * 1e3, ts[path] / ts["reference"])
        fallback.append(f"d_sae {n}: max {cand['max_per_row']} candidates in a row, {cand['fallback_rows']} "
                        f"fallback rows; bare GEMM {tm['gemm'] * 1e3:.0f} ms fp32, {tm['gemm_bf16'] * 1e3:.0f} ms bf16")
    t.note = (f"B={a.batch}, d_in={a.d_in}, k={a.k}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"capability {torch.backends.cpu.get_cpu_capability()}; medians of {a.reps} alternated runs. "
              f"The floor is the bare GEMM's time over the reference's: fp32 for chunked, bf16 for screened. "
              f"Screened: " + "; ".join(fallback) + ".")


def gpu_section(a, res):
    """Section 4: Triton vs the dense reference (and the chunked torch path) on the GPU, bf16 at the issue's
    shape: forward time and peak memory, and a TopK SAE training step (loss + backward)."""
    if not torch.cuda.is_available():
        print("GPU section skipped: CUDA is not available on this machine (Triton vs reference not measured)")
        return
    from saelab.kernels.dispatch import triton_available
    if not triton_available():
        print("GPU section skipped: triton does not import")
        return
    B, d, n, k = a.batch, 768, 32768, 32
    x, W, b = inputs(B, d, n, torch.bfloat16, "cuda")
    sync = torch.cuda.synchronize
    paths = ("reference", "chunked", "triton", "triton threshold")  # names as use_path reads them
    with torch.no_grad():
        t = alternate({kern: (lambda kern=kern: topk_encode(x, W, b, k, kernel=use_path(kern))) for kern in paths},
                      max(a.reps, 10), sync)
        peak = {}
        for kern in paths:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            topk_encode(x, W, b, k, kernel=use_path(kern))
            sync()
            peak[kern] = torch.cuda.max_memory_allocated() - base
    del x, W, b
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=d, d_sae=n, k=k).cuda().bfloat16()
    xs = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
    ts = alternate({kern: train_step(sae, xs, kern) for kern in paths}, max(a.reps, 10), sync)
    name = torch.cuda.get_device_name()
    res.env["device"] = f"cuda: {name}"
    tab = res.table(f"GPU ({name}): Triton and chunked vs the reference, bf16",
                    ["path", "forward ms", "forward speed-up vs reference", "peak extra MiB", "train step ms",
                     "step speed-up"],
                    note=f"B={B}, d_in={d}, d_sae={n}, k={k}, bf16, torch {torch.__version__}; medians of "
                         f"{max(a.reps, 10)} alternated runs",
                    fmt={"forward ms": ".2f", "forward speed-up vs reference": ".2f", "peak extra MiB": ".1f",
                         "train step ms": ".2f", "step speed-up": ".2f"})
    for kern in paths:
        tab.row(kern, t[kern] * 1e3, t["reference"] / t[kern], peak[kern] / 2**20, ts[kern] * 1e3,
                ts["reference"] / ts[kern])


if __name__ == "__main__":
    main()
