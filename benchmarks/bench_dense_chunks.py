"""The dense (non-TopK) encode of a wide SAE in row chunks (``evaluate.dense_chunks``: each [rows, d_sae] code
tensor within ``DENSE_BUDGET``) vs the whole batch at once (the path before), as ratios measured in one run:
``evaluate_store`` and ``analyze``'s sparse codes of a JumpReLU SAE over a synthetic store. Each variant runs
in a fresh process (medians of --reps, alternated); memory is the peak RSS growth over the call.

    python benchmarks/bench_dense_chunks.py [--width 131072] [--d-in 128] [--rows 16384] [--reps 3]

At the default width one batch of 4,096 rows holds 2 GiB per [4096, d_sae] tensor on the unchunked path.
Writes ``benchmarks/results/bench_dense_chunks.json`` (``results.py``).
"""

import argparse
import tempfile

from procmem import alternate, ratio_table
from results import Result

CHILD = r"""
import json, sys, time
import torch
from procmem import peak_rss_bytes, rss_bytes
import saelab.evaluate as E
from saelab.analysis.features import sparse_codes
from saelab.sae.base import SAE
from saelab.store import ActivationStore

store_path, how, width, d_in, rows = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
if how == "whole batch":
    E.DENSE_BUDGET = 1 << 62
torch.manual_seed(0)
sae = SAE.create("jumprelu", d_in=d_in, d_sae=width, k=32)
store = ActivationStore(store_path)
x = next(iter(store.batches(4096, split="all", tokens=4096, shuffle=False)))
before = rss_bytes()
t = time.perf_counter()
with torch.no_grad():
    ev = E.evaluate_store(sae, store, max_rows=rows, batch_size=4096)
    keys, _ = sparse_codes(sae, x)
print(json.dumps({"s": time.perf_counter() - t, "peak": peak_rss_bytes() - before, "fvu": ev["fvu"],
                  "codes": int(len(keys))}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=131072)
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    res = Result("bench_dense_chunks", "Dense encode of a wide SAE: row chunks vs the whole batch",
                 "The dense (non-TopK) encode of a wide JumpReLU SAE in row chunks (`evaluate.dense_chunks`: each "
                 "[rows, d_sae] code tensor within `DENSE_BUDGET`) against the whole batch at once: "
                 "`evaluate_store` over a synthetic store plus `analyze`'s sparse codes of 4,096 rows. Each variant "
                 "runs in a fresh process, the two alternated, medians; memory is the peak RSS growth over the call. "
                 "Both variants' FVU and code counts are compared.")
    from saelab.synthetic import SyntheticConfig, write_synthetic

    with tempfile.TemporaryDirectory() as d:
        store = write_synthetic(SyntheticConfig(out=f"{d}/store", d=a.d_in, n_true=256, active=5, rows=a.rows),
                                progress=False)
        runs = alternate({how: ["-c", CHILD, str(store), how, str(a.width), str(a.d_in), str(a.rows)]
                          for how in ("whole batch", "row chunks")}, a.reps)
    same = {(r["fvu"], r["codes"]) for rs in runs.values() for r in rs[:1]}
    agree = ("agree" if len({round(f, 6) for f, _ in same}) == 1 and len({c for _, c in same}) == 1 else
             f"DIFFER: {sorted(same)}")
    ratio_table(res, f"JumpReLU, d_in {a.d_in}, {a.width:,} latents", runs, "whole batch",
                note=f"evaluate_store over {a.rows:,} rows + analyze's codes of 4,096 rows, fresh processes, medians "
                     f"of {a.reps}; FVU and code counts {agree}")
    res.write()

if __name__ == "__main__":
    main()
