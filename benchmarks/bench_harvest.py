"""Harvest overhead and store read rate, as ratios measured in one run.

    python benchmarks/bench_harvest.py [--tokens 131072]

Rows: (1) harvest wall time / bare forward of the same loaded model up to the same layer on
the same tokens (target <= 1.15: writing hidden behind compute); (2) the store's shuffled
read rate / a plain sequential h5py read of the same rows. Writes
``benchmarks/results/bench_harvest.json`` (``results.py``).
"""

import argparse
import itertools
import pathlib
import statistics
import tempfile
import time

import h5py
import numpy as np
import torch

from results import Result
from saelab.config import HarvestConfig
from saelab.data import iter_contexts, load_documents
from saelab.harvest import harvest
from saelab.hooks import StopForward as _StopForward
from saelab.models import load_model, tokenizer_bos
from saelab.store import ActivationStore


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128 * 1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    res = Result("bench_harvest", "Harvest overhead and store read rate",
                 "Harvest wall time of the bundled tiny model's `blocks.1.hook_resid_post` over a bare forward of "
                 "the same loaded model up to the same layer (stopped right after the hook fires) on the same "
                 "tokens, the two alternated, median of the runs (target ≤ 1.15: writing hidden behind compute); "
                 "the store's shuffled read rate (`ActivationStore.batches`, checksums off) over a plain sequential "
                 "h5py read of the same rows; and the one-off sha256 verification of the shards over that "
                 "sequential read.")
    model = load_model("tiny", "cpu")
    hook, ctx = "blocks.1.hook_resid_post", 128
    bos = tokenizer_bos(model.tokenizer)
    docs, col = load_documents("tiny", seed=0)
    toks = np.stack(list(itertools.islice(iter_contexts(docs, model.tokenizer, ctx, bos, col), a.tokens // ctx)))
    with tempfile.TemporaryDirectory() as tmp:
        # the bare forward stops where harvest does: right after the hook point fires
        def stop(tensor, hook):
            raise _StopForward

        def bare():
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(toks), a.batch_size):
                    try:
                        model.run_with_hooks(torch.from_numpy(toks[i : i + a.batch_size]).long(),
                                             fwd_hooks=[(hook, stop)])
                    except _StopForward:
                        pass
            return time.perf_counter() - t0

        def harvested(i):
            cfg = HarvestConfig(hooks=[hook], out=f"{tmp}/run{i}", tokens=len(toks) * ctx, holdout=0,
                                batch_size=a.batch_size)
            t0 = time.perf_counter()
            harvest(cfg, progress=False, model=model)
            return time.perf_counter() - t0

        ratios = [harvested(i) / bare() for i in range(a.repeats)]  # alternating, median reported
        path = pathlib.Path(f"{tmp}/run0/{hook}")
        store = ActivationStore(path)
        n = store.n_rows("all")
        t0 = time.perf_counter()
        for s in store.shards:
            with h5py.File(path / s["file"]) as f:
                f["activations"][:]
        t_seq = time.perf_counter() - t0
        store.verify = False  # checksum cost is a one-off, measured separately below
        t0 = time.perf_counter()
        for _ in store.batches(4096, split="all", seed=0):
            pass
        t_shuf = time.perf_counter() - t0
        t0 = time.perf_counter()
        ActivationStore(path).rows([0])  # first open verifies a shard's sha256
        t_verify = (time.perf_counter() - t0) * len(store.shards)
    t = res.table(f"Harvest and read ratios ({n:,} tokens, tiny model, {hook})", ["measure", "value"],
                  note=f"harvest / bare forward, each of the {a.repeats} alternated runs: "
                       + ", ".join(f"{r:.3f}" for r in ratios),
                  fmt={"value": ".3f"})
    t.row("harvest wall / bare forward (target <= 1.15)", statistics.median(ratios))
    t.row("shuffled read rate / sequential h5py read", t_seq / t_shuf)
    t.row("sha256 verification / sequential read (one-off per shard)", t_verify / t_seq)
    res.write()

if __name__ == "__main__":
    main()
