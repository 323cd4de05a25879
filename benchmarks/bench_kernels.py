"""TopK encode paths on this machine: time (forward + backward) and peak extra memory, in one run.

    python benchmarks/bench_kernels.py [--batch 4096 --d-in 512 --width 16384 --k 32]

Rows: the reference (torch.topk of the full pre-activation, autograd through gather) and the
chunked path at several chunk sizes; the bare encoder GEMM gives the floor. Memory: the
largest single temporary the path needs (the [B, d_sae] pre-activation for the reference,
[B, chunk] for chunked), printed from the shapes, plus the peak RSS growth measured by the
allocator where torch reports it (CUDA only).
"""

import argparse
import statistics
import time

import torch

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
    print(f"B={a.batch}, d_in={a.d_in}, d_sae={a.width}, k={a.k}, {torch.get_num_threads()} threads; "
          f"bare GEMM {gemm * 1e3:.0f} ms")
    print("| path | forward ms | fwd+bwd ms | forward / GEMM | largest temporary |")
    print("|---|---|---|---|---|")
    rows = [("reference", "reference", 0)] + [(f"chunked {c}", "chunked", c) for c in (1024, 2048, 4096)]
    for name, kernel, chunk in rows:
        f = timed(run(kernel, chunk or 2048, backward=False), a.reps)
        fb = timed(run(kernel, chunk or 2048), a.reps)
        tmp = a.batch * (a.width if kernel == "reference" else chunk) * 4 / 2**20
        print(f"| {name} | {f * 1e3:.0f} | {fb * 1e3:.0f} | {f / gemm:.2f} | {tmp:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
