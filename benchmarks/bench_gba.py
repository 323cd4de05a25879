"""Group bias adaptation against the L1-trained ReLU SAE and TopK at equal L0 (Chen et al. 2025's claim: GBA recovers
the planted features, with a better sparsity-reconstruction trade-off than L1 and TopK), from the CLI: one
planted-feature store (``saelab synthetic``: d 64, 256 features, ~5 active), then ``saelab train`` of each variant at
k 5 and ``saelab eval --suite core,truth``.

    python benchmarks/bench_gba.py [--tokens 1228800] [--width 512] [--threads 1]

The variants: ``--arch relu`` (its L1 coefficient adapted to L0 = k), ``--arch relu --bias-adaptation`` with the
default 10 groups and with one group (single-group bias adaptation: every latent at the target k / width, the
planted features' own frequency here), and ``--arch topk``. A planted feature counts as recovered when some decoder
row has |cosine| ≥ 0.9 with it. Writes ``benchmarks/results/bench_gba.json`` (``results.py``).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from bench_mfr import recovered
from results import Result
from runs import planted_store, saelab_cli

VARIANTS = {"relu (L1)": ["--arch", "relu"], "relu + GBA, 10 groups": ["--arch", "relu", "--bias-adaptation"],
            "relu + GBA, 1 group": ["--arch", "relu", "--bias-adaptation", "--gba-groups", "1"],
            "topk": ["--arch", "topk"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_228_800)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    res = Result("bench_gba", "Group bias adaptation against L1 and TopK",
                 f"One planted-feature store (`saelab synthetic --d 64 --n-true 256 --active 5`, 262,144 rows); each "
                 f"variant trained by `saelab train` at k {a.k} (the L0 target of relu's L1 controller and of GBA's "
                 f"frequency targets), {a.width} latents, {a.tokens:,} tokens in batches of 1,024 at LR 3e-3, seed 0, "
                 "and scored by `saelab eval --suite core,truth` on the held-out rows. Recovered: planted features "
                 "that some decoder row matches at |cos| ≥ 0.9.", threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)

        saelab = saelab_cli(a.threads)
        store = planted_store(saelab, root)
        t = res.table("Planted-feature recovery at equal L0", ["variant", "L0", "FVU", "MMCS", "recovered ≥ 0.9",
                                                               "dead", "seconds"],
                      fmt={"L0": ".2f", "FVU": ".3f", "MMCS": ".3f", "recovered ≥ 0.9": ".1%", "dead": ".0f",
                           "seconds": ".0f"})
        for i, (name, flags) in enumerate(VARIANTS.items()):
            out = root / f"v{i}"
            start = time.perf_counter()
            saelab("train", "--activations", store, "--out", out, *flags, "--k", a.k, "--width", a.width, "--tokens",
                   a.tokens, "--batch-size", 1024, "--lr", "3e-3")
            seconds = time.perf_counter() - start
            saelab("eval", "--sae", out, "--suite", "core,truth")
            ev = json.loads((out / "eval.json").read_text())
            t.row(name, ev["l0"], ev["fvu"], ev["truth"]["mmcs"], recovered(out, store, 0.9),
                  ev["truth"]["dead_latents"], seconds)
            print(f"# {name}: MMCS {ev['truth']['mmcs']:.3f}", file=sys.stderr)
    res.write()


if __name__ == "__main__":
    main()
