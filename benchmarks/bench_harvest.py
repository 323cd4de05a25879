"""Harvest overhead and store read rate, as ratios measured in one run.

    python benchmarks/bench_harvest.py [--tokens 131072]

Rows: (1) harvest wall time / bare forward of the same loaded model up to the same layer on
the same tokens (target <= 1.15: writing hidden behind compute); (2) the store's shuffled
read rate / a plain sequential h5py read of the same rows.
"""

import argparse
import itertools
import tempfile
import time

import h5py
import numpy as np
import torch

from saelab.config import HarvestConfig
from saelab.data import iter_contexts, load_documents
from saelab.harvest import harvest
from saelab.models import load_model, tokenizer_bos
from saelab.store import ActivationStore


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128 * 1024)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    model = load_model("tiny", "cpu")
    hook, ctx = "blocks.1.hook_resid_post", 128
    bos = tokenizer_bos(model.tokenizer)
    docs, col = load_documents("tiny", seed=0)
    toks = np.stack(list(itertools.islice(iter_contexts(docs, model.tokenizer, ctx, bos, col), a.tokens // ctx)))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(hooks=[hook], out=f"{tmp}/run", tokens=len(toks) * ctx, holdout=0,
                            batch_size=a.batch_size)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(toks), a.batch_size):
                model(torch.from_numpy(toks[i : i + a.batch_size]).long(), stop_at_layer=2)
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = harvest(cfg, progress=False, model=model)[hook]
        t_harvest = time.perf_counter() - t0
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
    print(f"| measure ({n:,} tokens, tiny model, {hook}) | value |")
    print("|---|---|")
    print(f"| harvest wall / bare forward (target <= 1.15) | {t_harvest / t_fwd:.3f} |")
    print(f"| shuffled read rate / sequential h5py read | {t_seq / t_shuf:.3f} |")
    print(f"| sha256 verification / sequential read (one-off per shard) | {t_verify / t_seq:.3f} |")


if __name__ == "__main__":
    main()
