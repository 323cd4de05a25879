"""Archetypal SAE against TopK across training seeds (Fel et al. 2025's claim: dictionaries far more stable across
seeds than TopK's), from the CLI: one planted-feature store (``saelab synthetic``: d 64, 256 features, ~5 active),
three seeds of each architecture at the same k and width and tokens, then ``saelab eval --suite core,truth`` on each
(FVU, MMCS, dead latents) and ``--suite stability`` across the seeds (mean cosine of Hungarian-matched decoder rows,
the fraction matched above 0.9, the spread over the three pairs).

    python benchmarks/bench_archetypal.py [--tokens 1228800] [--width 512] [--seeds 3] [--threads 1]

Writes ``benchmarks/results/bench_archetypal.json`` (``results.py``).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from results import Result
from runs import planted_store, saelab_cli

ARCHS = ("topk", "archetypal")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_228_800)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    res = Result("bench_archetypal", "Archetypal SAE against TopK across seeds",
                 f"One planted-feature store (`saelab synthetic --d 64 --n-true 256 --active 5`, 262,144 rows); "
                 f"{a.seeds} training seeds of TopK and of the relaxed archetypal SAE (its atoms in the convex hull of "
                 f"2,048 training rows, relaxation δ = 1), k {a.k}, {a.width} latents, {a.tokens:,} tokens in batches "
                 "of 1,024 at LR 3e-3; each scored by `saelab eval --suite core,truth`, and the seeds against each "
                 "other by `--suite stability` (mean cosine of Hungarian-matched decoder rows over the seed pairs, "
                 "their min and max, and the fraction of latents matched above 0.9).", threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)

        saelab = saelab_cli(a.threads)
        store = planted_store(saelab, root)
        t = res.table("Seed stability and recovery", ["arch", "stability", "min", "max", "matched ≥ 0.9", "MMCS",
                                                      "FVU", "dead", "seconds per run"],
                      note="MMCS, FVU (held-out) and dead latents: means over the seeds",
                      fmt={"stability": ".3f", "min": ".3f", "max": ".3f", "matched ≥ 0.9": ".1%", "MMCS": ".3f",
                           "FVU": ".3f", "dead": ".1f", "seconds per run": ".0f"})
        for arch in ARCHS:
            runs, seconds = [], 0.0
            for seed in range(a.seeds):
                out = root / f"{arch}{seed}"
                start = time.perf_counter()
                saelab("train", "--activations", store, "--out", out, "--arch", arch, "--k", a.k, "--width", a.width,
                       "--tokens", a.tokens, "--batch-size", 1024, "--lr", "3e-3", "--seed", seed)
                seconds += time.perf_counter() - start
                saelab("eval", "--sae", out, "--suite", "core,truth")
                runs.append(out)
            saelab("eval", "--sae", runs[0], "--suite", "stability", *[x for r in runs[1:] for x in ("--against", r)])
            evs = [json.loads((r / "eval.json").read_text()) for r in runs]
            st = evs[0]["stability"]
            mean = lambda key, sub="truth": sum(e[sub][key] if sub else e[key] for e in evs) / len(evs)  # noqa: E731
            t.row(arch, st["mean_cos"], st["min_cos"], st["max_cos"], st["frac_above"], mean("mmcs"),
                  mean("fvu", None), mean("dead_latents"), seconds / a.seeds)
            print(f"# {arch}: stability {st['mean_cos']:.3f}", file=sys.stderr)
    res.write()


if __name__ == "__main__":
    main()
