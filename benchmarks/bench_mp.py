"""Matching-pursuit SAE (--arch mp) against TopK at equal k and width on planted features, through the CLI: the
shipped generator's default store (d 64, 256 features, ~5 active), then a planted hierarchy with conditionally
orthogonal children (--hierarchy 32 --children 4 --orthogonal-children: each child's direction orthogonal to its
parent's, Costa et al. 2025) and, as a control, the same hierarchy without --orthogonal-children. Each SAE's
recovery is scored per group of planted features: the mean over the group of each feature's best cosine with any
decoder row (MMCS of the parents, of the children, of the plain features), with the held-out FVU and L0.

    python benchmarks/bench_mp.py [--tokens 1228800] [--k 5] [--width 512] [--seeds 0,1] [--threads 1]

Writes ``benchmarks/results/bench_mp.json`` (``results.py``).
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from results import Result

STORES = (("default", []),
          ("hierarchy, orthogonal children", ["--hierarchy", "32", "--children", "4", "--orthogonal-children"]),
          ("hierarchy, random children", ["--hierarchy", "32", "--children", "4"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_228_800, help="training tokens of each SAE")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seeds", default="0,1", help="training seeds (the stores' seed is 0)")
    ap.add_argument("--archs", default="mp,topk")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from saelab.layout import read_eval
    from saelab.sae import SAE
    from saelab.synthetic import best_match, load_truth

    seeds = [int(s) for s in a.seeds.split(",")]
    archs = a.archs.split(",")
    res = Result("bench_mp", "Matching-pursuit SAE against TopK on planted features",
                 "Planted-feature stores of `saelab synthetic --d 64 --n-true 256 --active 5` (65,536 rows, store "
                 "seed 0): the default, one with 32 parents of 4 children each whose directions are made orthogonal "
                 "to their parent's (`--hierarchy 32 --children 4 --orthogonal-children`, the conditionally "
                 "orthogonal children of Costa et al. 2025), and the same hierarchy with random child directions. "
                 "`saelab train --arch mp` and `--arch topk` at the same k, width, learning rate, batch and tokens "
                 "on each store, for each training seed. Per group of planted features, MMCS is the mean over "
                 "the group of each feature's best cosine with any decoder row (parents, children, and the plain "
                 "features, neither parent nor child); FVU and L0 are the trainer's held-out eval. TopK's L0 is k; "
                 "MP's is at most k (a repeated atom, or a step that adds nothing, uses no new latent).",
                 threads=a.threads)
    t = res.table(f"k {a.k}, width {a.width}, {a.tokens:,} tokens in batches of {a.batch_size:,}, lr {a.lr:g}",
                  ["store", "arch", "seed", "MMCS all", "MMCS parents", "MMCS children", "MMCS plain", "FVU", "L0",
                   "dead %", "train seconds"],
                  note=f"{a.threads} torch thread(s) per training run; one store seed, training seeds "
                       f"{', '.join(map(str, seeds))}",
                  fmt={"MMCS all": ".3f", "MMCS parents": ".3f", "MMCS children": ".3f", "MMCS plain": ".3f",
                       "FVU": ".3f", "L0": ".2f", "dead %": ".1f", "train seconds": ".1f"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads)}

    def saelab(*argv):
        subprocess.run([sys.executable, "-m", "saelab", *map(str, argv), "--quiet"], check=True, env=env)

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name, flags in STORES:
            store = root / name.replace(" ", "_").replace(",", "")
            saelab("synthetic", "--out", store, "--d", "64", "--n-true", "256", "--active", "5", *flags)
            truth, info = load_truth(store)
            parents = sorted(info["hierarchy"])
            children = [c for p in parents for c in info["hierarchy"][p]]
            plain = [i for i in range(len(truth)) if i not in set(parents) | set(children)]
            for arch in archs:
                for seed in seeds:
                    out = root / f"{store.name}-{arch}-{seed}"
                    start = time.perf_counter()
                    saelab("train", "--activations", store, "--arch", arch, "--k", a.k, "--width", a.width,
                           "--lr", a.lr, "--batch-size", a.batch_size, "--tokens", a.tokens, "--seed", seed,
                           "--out", out)
                    seconds = time.perf_counter() - start
                    cos = best_match(SAE.load(out).W_dec.detach(), truth)[0]
                    group = lambda ids: float(cos[ids].mean()) if ids else None  # noqa: E731
                    ev = read_eval(out)
                    t.row(name, arch, seed, float(cos.mean()), group(parents), group(children), group(plain),
                          ev["fvu"], ev["l0"], 100 * ev["dead_frac"], seconds)
    res.write()


if __name__ == "__main__":
    main()
