"""Feature Choice and Mutual Choice SAEs against TopK on planted features, from the CLI: recovery, per-token L0, dead
latents.

    python benchmarks/bench_choice.py [--rows 262144] [--tokens 3000000] [--k 5] [--expansion 16] [--threads 1]

``saelab synthetic --d 64 --n-true 256 --active 5`` writes one store; ``saelab train`` trains topk, featurechoice and
mutualchoice on it with the same k, width, batch, LR, seed and tokens; ``saelab eval --suite core,truth`` scores each.
The per-token L0 is that of each saved SAE's inference codes on the held-out rows the truth suite scores (for the
choice SAEs: their thresholds, no batch). Writes ``benchmarks/results/bench_choice.json`` (``results.py``).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from results import Result

ARCHS = ["topk", "featurechoice", "mutualchoice"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=262_144, help="rows of the synthetic store")
    ap.add_argument("--tokens", type=int, default=3_000_000, help="training tokens of each SAE")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs", default=",".join(ARCHS))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from saelab.layout import read_eval
    from saelab.sae import SAE
    from saelab.store import ActivationStore
    from saelab.suites.truth import rows_of

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    res = Result("bench_choice", "Feature Choice and Mutual Choice SAEs against TopK on planted features",
                 "One `saelab synthetic --d 64 --n-true 256 --active 5` store; `saelab train` trains TopK, Feature "
                 "Choice and Mutual Choice SAEs on it with the same k, width, batch, LR, seed and token budget, and "
                 "`saelab eval --suite core,truth` scores each on the held-out rows. MMCS: the mean over planted "
                 "features of their best |cosine| with a decoder row. Per-token L0: the number of latents each "
                 "held-out row's inference code holds (the choice SAEs encode through their thresholds, one row at a "
                 "time as much as in a batch): its mean, standard deviation, 10th and 90th percentiles and maximum. "
                 "Dead: latents that fire on none of the held-out rows (the truth suite's count, and core's dead "
                 "fraction of the width).",
                 threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        store = root / "planted"

        def saelab(*argv):
            subprocess.run([sys.executable, "-m", "saelab", *map(str, argv), "--quiet"], check=True, env=env)

        saelab("synthetic", "--out", store, "--d", 64, "--n-true", 256, "--active", 5, "--rows", a.rows)
        st = ActivationStore(store)
        x = st.rows(rows_of(st))
        width = a.expansion * 64
        t = res.table(f"k {a.k}, {a.expansion}× width ({width} latents), {a.tokens:,} tokens in batches of "
                      f"{a.batch_size:,} ({a.tokens // a.batch_size} steps), LR {a.lr:g}",
                      ["arch", "MMCS", "FVU", "L0 mean", "L0 std", "L0 p10", "L0 p90", "L0 max", "dead latents",
                       "dead (core)", "train seconds"],
                      fmt={"MMCS": ".3f", "FVU": ".3f", "L0 mean": ".2f", "L0 std": ".2f", "L0 p10": ".0f",
                           "L0 p90": ".0f", "L0 max": ".0f", "dead (core)": ".1%", "train seconds": ".0f"})
        hist = {}
        for arch in a.archs.split(","):
            out = root / arch
            start = time.perf_counter()
            saelab("train", "--activations", store, "--out", out, "--arch", arch, "--k", a.k, "--expansion",
                   a.expansion, "--tokens", a.tokens, "--batch-size", a.batch_size, "--lr", a.lr)
            seconds = time.perf_counter() - start
            saelab("eval", "--sae", out, "--suite", "core,truth")
            ev = read_eval(out)
            truth = ev.get("truth", ev)
            sae = SAE.load(out).eval()
            with torch.no_grad():
                l0 = torch.cat([(sae.encode(x[i:i + 4096]) != 0).sum(-1) for i in range(0, len(x), 4096)]).float()
            q = torch.quantile(l0, torch.tensor([0.1, 0.9]))
            hist[arch] = torch.bincount(l0.long()).tolist()
            t.row(arch, truth["mmcs"], ev["fvu"], l0.mean(), l0.std(), q[0], q[1], l0.max(), truth["dead_latents"],
                  ev["dead_frac"], seconds)
            print(json.dumps({"arch": arch, "eval": {k: v for k, v in ev.items() if not isinstance(v, (dict, list))},
                              "truth": {k: v for k, v in truth.items() if not isinstance(v, (dict, list))}}))
        t.note = (f"{len(x):,} held-out rows of a {a.rows:,}-row store; {a.threads} thread(s). The choice SAEs' "
                  "per-token L0 varies by design (a budget of k·B matches per batch, not k per token); TopK's is k "
                  "wherever k pre-activations are positive")
        n = max(len(h) for h in hist.values())
        h = res.table("Per-token L0 histogram (held-out rows per L0 value)", ["L0", *hist],
                      note="the share of held-out rows whose inference code holds that many latents")
        for v in range(n):
            counts = [c[v] if v < len(c) else 0 for c in hist.values()]
            if any(counts):
                h.row(v, *(c / len(x) for c in counts))
    res.write()


if __name__ == "__main__":
    main()
