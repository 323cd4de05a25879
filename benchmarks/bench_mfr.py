"""Mutual feature regularisation against the same SAEs trained alone (Marks et al. 2024's claim: more planted features
recovered), from the CLI: one planted-feature store (``saelab synthetic``: d 64, 256 features, ~5 active), then
``saelab train --mfr 2`` at each coefficient, 0 first (the members train independently: the same inits and batches
as the regularised groups, no penalty), then ``saelab eval --suite core,truth`` on every member.

    python benchmarks/bench_mfr.py [--tokens 153600,307200,1228800] [--width 512] [--coeffs 0,0.1,1] [--threads 1]

A planted feature counts as recovered when some decoder row has |cosine| ≥ 0.9 with it (and at 0.99, a stricter
cut). Writes ``benchmarks/results/bench_mfr.json`` (``results.py``).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from results import Result
from runs import planted_store, saelab_cli


def recovered(member: pathlib.Path, store: pathlib.Path, cut: float) -> float:
    """The fraction of the store's planted directions that some decoder row of ``member`` matches at |cos| ≥ cut."""
    from saelab.sae import SAE
    from saelab.suites.matching import cosines
    from saelab.synthetic import load_truth

    directions, _ = load_truth(store)
    cos = cosines(SAE.load(member).W_dec.detach().numpy(), directions.numpy(), absolute=True)  # [d_sae, n_true]
    return float((cos.max(0) >= cut).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="153600,307200,1228800", help="training budgets, one set of groups each")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--coeffs", default="0,0.1,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    coeffs = [float(c) for c in a.coeffs.split(",")]
    budgets = [int(t) for t in a.tokens.split(",")]
    res = Result("bench_mfr", "Mutual feature regularisation against the same SAEs trained alone",
                 f"One planted-feature store (`saelab synthetic --d 64 --n-true 256 --active 5`, 262,144 rows); "
                 f"`saelab train --arch topk --mfr {a.members}` at each `--mfr-coeff` (0: the members train "
                 f"independently from the same inits on the same batches), k {a.k}, {a.width} latents, "
                 f"{', '.join(f'{t:,}' for t in budgets)} tokens in batches of 1,024 at LR 3e-3, seed {a.seed} "
                 f"(members from seeds "
                 f"{a.seed}..{a.seed + a.members - 1}); each member scored by `saelab eval --suite core,truth`. "
                 "Recovered: planted features that some decoder row matches at |cos| ≥ 0.9 (0.99).", threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)

        saelab = saelab_cli(a.threads)
        store = planted_store(saelab, root)
        t = res.table("Planted features recovered", ["tokens", "mfr coeff", "member", "recovered ≥ 0.9",
                                                     "recovered ≥ 0.99",
                                                     "MMCS", "FVU", "dead", "members' decoder MMCS",
                                                     "seconds per group"],
                      note="members' decoder MMCS: the symmetric mean max cosine between the group's two dictionaries "
                           "(mfr.json); the last row of each coefficient is the members' mean",
                      fmt={"tokens": ",d", "recovered ≥ 0.9": ".1%", "recovered ≥ 0.99": ".1%", "MMCS": ".3f",
                           "FVU": ".3f",
                           "dead": ".0f", "members' decoder MMCS": ".3f", "seconds per group": ".0f"})
        for tokens in budgets:
            for coeff in coeffs:
                out = root / f"mfr{tokens}_{coeff:g}"
                start = time.perf_counter()
                saelab("train", "--activations", store, "--out", out, "--arch", "topk", "--k", a.k, "--width",
                       a.width, "--tokens", tokens, "--batch-size", 1024, "--lr", "3e-3", "--seed", a.seed, "--mfr",
                       a.members, "--mfr-coeff", coeff)
                seconds = time.perf_counter() - start
                meta = json.loads((out / "mfr.json").read_text())
                pair = sum(meta["mmcs"].values()) / len(meta["mmcs"])
                rows = []
                for name in meta["members"]:
                    saelab("eval", "--sae", out / name, "--suite", "core,truth")
                    ev = json.loads((out / name / "eval.json").read_text())
                    rows.append([recovered(out / name, store, 0.9), recovered(out / name, store, 0.99),
                                 ev["truth"]["mmcs"], ev["fvu"], ev["truth"]["dead_latents"]])
                    t.row(tokens, coeff, name, *rows[-1], pair, seconds)
                t.row(tokens, coeff, "mean", *[sum(r[i] for r in rows) / len(rows) for i in range(5)], pair, seconds)
                print(f"# {tokens:,} tokens, coeff {coeff:g}: recovered {sum(r[0] for r in rows) / len(rows):.1%}, "
                      f"pair MMCS {pair:.3f}", file=sys.stderr)
    res.write()


if __name__ == "__main__":
    main()
