"""JumpReLU's convergence on planted features against TopK, by budget, LR and the thresholds' LR multiplier
(``--threshold-lr``), from the CLI: one planted-feature store (``saelab synthetic``: d 64, 256 features, ~5 active,
coefficients uniform in [0.5, 1.5]), each run at k 5 and 512 latents, scored by ``saelab eval --suite core,truth``.

    python benchmarks/bench_jumprelu.py [--threads 1]

Adam moves log θ by about LR × (threshold LR multiplier) per step whatever the gradient's size, and a latent's
encoder row learns only while it fires, so what a JumpReLU run reaches depends on its steps and LR, not its tokens.
Writes ``benchmarks/results/bench_jumprelu.json`` (``results.py``).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from results import Result
from runs import planted_store, saelab_cli

#: (arch, tokens, batch, lr or None for the default, threshold-lr or None for the default)
RUNS = [("topk", 1_048_576, 4096, None, None), ("jumprelu", 1_048_576, 4096, None, 1), ("jumprelu", 1_048_576, 4096,
        None, 10), ("topk", 4_194_304, 4096, None, None), ("jumprelu", 4_194_304, 4096, None, 1),
        ("jumprelu", 4_194_304, 4096, None, 10), ("jumprelu", 1_228_800, 1024, 3e-3, 1),
        ("jumprelu", 1_228_800, 1024, 3e-3, 10)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    res = Result("bench_jumprelu", "JumpReLU's convergence by steps, LR and threshold LR",
                 "One planted-feature store (`saelab synthetic --d 64 --n-true 256 --active 5`, 262,144 rows, "
                 "coefficients uniform in [0.5, 1.5]); `saelab train` at k 5 (JumpReLU's target L0), 512 latents, "
                 "seed 0, each budget, batch and LR as listed (default LR: 2e-4 / sqrt(512 / 16384) = 1.13e-3), and "
                 "`--threshold-lr` as listed; scored by `saelab eval --suite core,truth` on the held-out rows.",
                 threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)

        saelab = saelab_cli(a.threads)
        store = planted_store(saelab, root)
        t = res.table("Planted-feature recovery by budget", ["arch", "tokens", "batch", "steps", "LR",
                                                             "threshold LR ×", "L0", "FVU", "MMCS", "dead", "seconds"],
                      fmt={"tokens": ",d", "batch": ",d", "steps": ",d", "LR": ".2g", "L0": ".2f", "FVU": ".3f",
                           "MMCS": ".3f", "dead": ".0f", "seconds": ".0f"})
        for i, (arch, tokens, batch, lr, tlr) in enumerate(RUNS):
            out = root / f"r{i}"
            flags = (["--lr", lr] if lr else []) + (["--threshold-lr", tlr] if tlr is not None else [])
            start = time.perf_counter()
            saelab("train", "--activations", store, "--out", out, "--arch", arch, "--k", 5, "--width", 512, "--tokens",
                   tokens, "--batch-size", batch, *flags)
            seconds = time.perf_counter() - start
            saelab("eval", "--sae", out, "--suite", "core,truth")
            ev = json.loads((out / "eval.json").read_text())
            t.row(arch, tokens, batch, tokens // batch, lr or 2e-4 / (512 / 16384) ** 0.5,
                  tlr if arch == "jumprelu" else None, ev["l0"], ev["fvu"], ev["truth"]["mmcs"],
                  ev["truth"]["dead_latents"], seconds)
            print(f"# {arch} {tokens:,} {batch} {lr} {tlr}: MMCS {ev['truth']['mmcs']:.3f}", file=sys.stderr)
    res.write()


if __name__ == "__main__":
    main()
