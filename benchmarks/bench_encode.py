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
"""

import argparse
import json
import os
import statistics
import time

import torch

from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes, run_child
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
    if not a.gpu_only:
        cpu_sections(a, widths)
    gpu_section(a)


def cpu_sections(a, widths):
    """Sections 1-3: forward time, peak memory, training step on this CPU."""
    print(f"CPU: B={a.batch}, d_in={a.d_in}, k={a.k}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    for n in widths:
        x, W, b = inputs(a.batch, a.d_in, n)
        xq, Wq = x.bfloat16(), W.bfloat16()
        with torch.no_grad():
            t = alternate({"gemm": lambda: x @ W, "gemm_bf16": lambda: xq @ Wq,
                           "reference": lambda: topk_encode(x, W, b, a.k, kernel="reference"),
                           **{f: (lambda f=f: topk_encode(x, W, b, a.k, kernel=f)) for f in FUSED}}, a.reps)
            topk_encode(x, W, b, a.k, kernel="screened")
            from saelab.kernels.topk_encode import SCREEN_STATS
            cand = dict(SCREEN_STATS)
        del x, W, b, xq, Wq
        mem = {kern: measure_mem(kern, n, a) for kern in ("reference", *FUSED)}
        torch.manual_seed(0)
        sae = SAE.create("topk", d_in=a.d_in, d_sae=n, k=a.k)
        xs = torch.randn(a.batch, a.d_in)
        ts = alternate({kern: train_step(sae, xs, kern) for kern in ("reference", *FUSED)}, a.reps)
        del sae
        rows.append((n, t, cand, mem, ts))
        ms = lambda v: f"{v * 1e3:.0f}"  # noqa: E731
        print(f"d_sae {n}: forward ms " + ", ".join(f"{k} {ms(v)}" for k, v in t.items())
              + f"; screened candidates/row {cand['candidates'] / cand['rows']:.1f} (max {cand['max_per_row']}, "
              f"fallback rows {cand['fallback_rows']}); peak extra MiB "
              + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.items())
              + "; train step ms " + ", ".join(f"{k} {ms(v)}" for k, v in ts.items()), flush=True)
    print("\n| d_sae | path | forward ms | / reference | floor: GEMM / reference | candidates / row "
          "| peak extra MiB | / reference | train step ms | / reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, t, cand, mem, ts in rows:
        for path in ("reference", *FUSED):
            floor = {"reference": "", "chunked": f"{t['gemm'] / t['reference']:.2f} (fp32)",
                     "screened": f"{t['gemm_bf16'] / t['reference']:.2f} (bf16)"}[path]
            cpr = f"{cand['candidates'] / cand['rows']:.0f} (fallback rows {cand['fallback_rows']})" \
                if path == "screened" else ""
            print(f"| {n} | {path} | {t[path] * 1e3:.0f} | {t[path] / t['reference']:.2f} | {floor} | {cpr} "
                  f"| {mem[path] / 2**20:.0f} | {mem[path] / max(mem['reference'], 1):.3f} "
                  f"| {ts[path] * 1e3:.0f} | {ts[path] / ts['reference']:.2f} |")



def gpu_section(a):
    """Section 4: Triton vs the dense reference (and the chunked torch path) on the GPU, bf16 at the issue's
    shape: forward time and peak memory, and a TopK SAE training step (loss + backward)."""
    if not torch.cuda.is_available():
        print("GPU section skipped: CUDA is not available on this machine (Triton vs reference not measured)")
        return
    from saelab.kernels.topk_encode import triton_available
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
    print(f"GPU {torch.cuda.get_device_name()}: B={B}, d_in={d}, d_sae={n}, k={k}, bf16, torch {torch.__version__}")
    print("| path | forward ms | forward speed-up vs reference | peak extra MiB | train step ms | step speed-up |")
    print("|---|---|---|---|---|---|")
    for kern in paths:
        print(f"| {kern} | {t[kern] * 1e3:.2f} | {t['reference'] / t[kern]:.2f} | {peak[kern] / 2**20:.1f} "
              f"| {ts[kern] * 1e3:.2f} | {ts['reference'] / ts[kern]:.2f} |")


if __name__ == "__main__":
    main()
