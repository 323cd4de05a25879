"""TopK encode paths on this machine: time (forward + backward) and peak extra memory, in one run.

    python benchmarks/bench_kernels.py [--batch 4096 --d-in 512 --width 16384 --k 32]

Rows: the reference (torch.topk of the full pre-activation, autograd through gather) and the
chunked path at several chunk sizes; the bare encoder GEMM gives the floor. Memory: the
largest single temporary the path needs (the [B, d_sae] pre-activation for the reference,
[B, chunk] for chunked), printed from the shapes, plus the peak RSS growth measured by the
allocator where torch reports it (CUDA only). Writes ``benchmarks/results/bench_kernels.json``
(``results.py``).
"""

import argparse
import statistics
import time

import torch

from results import Result
from saelab.kernels import topk_encode


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    res = Result("bench_kernels", "TopK encode paths: time and largest temporary",
                 "The TopK encode paths (`saelab.kernels.topk_encode`) on random data: the reference (`torch.topk` "
                 "of the full pre-activation, autograd through gather) and the chunked path at several chunk sizes, "
                 "forward and forward + backward (median wall time after one warm-up), against the bare encoder GEMM "
                 "timed in the same run (the floor). The largest temporary is the biggest single tensor the path "
                 "needs, from the shapes: [B, d_sae] for the reference, [B, chunk] for chunked.")
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in)
    W = (torch.randn(a.d_in, a.width) / a.d_in**0.5).requires_grad_(True)
    b = torch.zeros(a.width, requires_grad=True)
    up = torch.randn(a.batch, a.k)

    def run(kernel, chunk=2048, backward=True):
        def fn():
            v, i = topk_encode(x, W, b, a.k, kernel=kernel, chunk=chunk)
            if backward:
                (v * up).sum().backward()
                W.grad = b.grad = None
        return fn

    gemm = timed(lambda: x @ W.detach(), a.reps)
    t = res.table("Forward and forward + backward per path",
                  ["path", "forward ms", "fwd+bwd ms", "forward / GEMM", "largest temporary (MiB)"],
                  note=f"B={a.batch}, d_in={a.d_in}, d_sae={a.width}, k={a.k}, {torch.get_num_threads()} threads; "
                       f"bare GEMM {gemm * 1e3:.0f} ms; medians of {a.reps}",
                  fmt={"forward ms": ".0f", "fwd+bwd ms": ".0f", "forward / GEMM": ".2f",
                       "largest temporary (MiB)": ".0f"})
    rows = [("reference", "reference", 0)] + [(f"chunked {c}", "chunked", c) for c in (1024, 2048, 4096)]
    for name, kernel, chunk in rows:
        f = timed(run(kernel, chunk or 2048, backward=False), a.reps)
        fb = timed(run(kernel, chunk or 2048), a.reps)
        tmp = a.batch * (a.width if kernel == "reference" else chunk) * 4 / 2**20
        t.row(name, f * 1e3, fb * 1e3, f / gemm, tmp)
    res.write()

if __name__ == "__main__":
    main()
