"""``saelab analyze`` on this machine, as ratios measured in one run.

    python benchmarks/bench_analyze.py [--rows 131072] [--reps 3] [--threads 1]

1. Throughput: ``analyze()`` end to end (the streaming pass, logit effects, neighbours, the HDF5
   write; model preloaded) against a bare pass of the SAE encoder (``sae.encode``, dense codes)
   over the same rows read the same way (``ActivationStore.batches(shuffle=False)``). Target:
   ≥ 0.5. Also against a bare pass of the encode analyze itself uses (``sparse_codes``: the
   chunked TopK encode), i.e. what the statistics cost on top of it. Variants alternate,
   medians of ``--reps``. SAEs: the demo's TopK SAE (d_in 128, 2048 latents, k 16) and
   a 16k-latent TopK SAE (k 32) on the same store.
2. Lazy reads: with the 16k-latent features file, the file bytes FeatureDB reads to open one
   latent card (after the database is open) over that latent's own stored bytes (the sum of its
   slices of the per-latent datasets). Target: ≤ 4.

The demo store is built on first use (``saelab.demo.ensure_group``, in ``$SAELAB_DEMO_DIR`` or
the current folder). Writes ``benchmarks/results/bench_analyze.json`` (``results.py``).
"""

import argparse
import pathlib
import statistics
import tempfile
import time

import h5py
import numpy as np
import torch

from results import Result
from saelab.analysis import features as F
from saelab.demo import ensure_group
from saelab.models import load_model
from saelab.sae.base import SAE
from saelab.store import ActivationStore


@torch.no_grad()
def bare_pass(sae, store_path, rows, encode, batch_size=F.BATCH_ROWS):
    store = ActivationStore(store_path)
    it = store.batches(batch_size, split="all", tokens=rows, shuffle=False)
    t0 = time.perf_counter()
    for x in it:
        encode(x)
    dt = time.perf_counter() - t0
    store.close()
    return dt


def throughput(table, name, sae_dir, store, rows, reps, model):
    sae = SAE.load(sae_dir).eval()
    bare, same, full = [], [], []
    for _ in range(reps):  # alternate the variants
        bare.append(bare_pass(sae, store, rows, sae.encode))
        same.append(bare_pass(sae, store, rows, lambda x: F.sparse_codes(sae, x)))
        t0 = time.perf_counter()
        F.analyze(sae_dir, store, tokens=rows, model=model, progress=False, device="cpu")
        full.append(time.perf_counter() - t0)
    b, s, a = statistics.median(bare), statistics.median(same), statistics.median(full)
    table.row(name, rows, rows / b, rows / s, rows / a, b / a, s / a)


def lazy_reads(res, sae_dir, n=20):
    with h5py.File(sae_dir / F.FEATURES_FILE) as f:
        d_sae = f.attrs["d_sae"]
        size = (sae_dir / F.FEATURES_FILE).stat().st_size
    db = F.FeatureDB(sae_dir)
    opened = db.bytes_read
    rng = np.random.default_rng(0)
    ratios, reads = [], []
    with h5py.File(sae_dir / F.FEATURES_FILE) as f:
        for i in rng.choice(d_sae, n, replace=False):
            own = sum(f[k][i].nbytes for k in F.PER_LATENT if k in f)
            before = db.bytes_read
            db.card(int(i))
            reads.append(db.bytes_read - before)
            ratios.append(reads[-1] / own)
    db.close()
    t = res.table("Lazy reads: file bytes read to open one latent card",
                  ["card reads", "bytes read per card (median)", "own bytes of the latent", "ratio median",
                   "ratio max"],
                  note=f"features file: {d_sae:,} latents, {size / 2**20:.1f} MiB; opening FeatureDB read "
                       f"{opened / 2**10:.0f} KiB (attrs, the [d_sae] arrays, dataset headers). Target: ratio ≤ 4.",
                  fmt={"bytes read per card (median)": ",.0f", "own bytes of the latent": ",",
                       "ratio median": ".2f", "ratio max": ".2f"})
    t.row(f"{n} random latents", statistics.median(reads), own, statistics.median(ratios), max(ratios))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=131072, help="rows analysed per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    res = Result("bench_analyze", "saelab analyze: throughput and lazy reads", DESCRIPTION)
    demo = ensure_group(analyze=False)
    hook = "blocks.1.hook_resid_post"
    store = demo.stores[hook]
    model = load_model("tiny", device="cpu")
    t = res.table("Throughput: analyze end to end against a bare encoder pass over the same rows",
                  ["SAE", "rows", "bare `sae.encode` pass, rows/s", "bare sparse-codes pass (analyze's encode), rows/s",
                   "analyze end to end, rows/s", "analyze / bare encode", "analyze / its own encode"],
                  note=f"store: the demo's {hook} ({ActivationStore(store).n_rows('all'):,} rows), "
                       f"{torch.get_num_threads()} torch threads, medians of {a.reps} alternated runs. "
                       f"Target: analyze / bare encode ≥ 0.5.",
                  fmt={"rows": ",", "bare `sae.encode` pass, rows/s": ",.0f",
                       "bare sparse-codes pass (analyze's encode), rows/s": ",.0f",
                       "analyze end to end, rows/s": ",.0f", "analyze / bare encode": ".2f",
                       "analyze / its own encode": ".2f"})
    with tempfile.TemporaryDirectory() as tmp:
        demo_copy = pathlib.Path(tmp) / "demo_sae"  # analyze writes features.h5: leave the demo's own alone
        demo_copy.mkdir()
        for f in ("cfg.json", "sae_weights.safetensors"):
            (demo_copy / f).write_bytes((demo.saes[hook] / f).read_bytes())
        throughput(t, "demo TopK, 2,048 latents", demo_copy, store, a.rows, a.reps, model)
        wide = pathlib.Path(tmp) / "wide"
        torch.manual_seed(0)
        SAE.create("topk", d_in=128, d_sae=16384, k=32, hook_name=hook, model_name="tiny").save(wide)
        throughput(t, "random TopK, 16,384 latents", wide, store, a.rows, a.reps, model)
        lazy_reads(res, wide)
    res.write()


DESCRIPTION = (
    "`saelab analyze` on this machine, as ratios measured in one run. Throughput: `analyze()` end to end (the "
    "streaming pass, logit effects, neighbours, the HDF5 write; model preloaded) against a bare pass of the SAE "
    "encoder (`sae.encode`, dense codes) over the same rows read the same way "
    "(`ActivationStore.batches(shuffle=False)`), and against a bare pass of the encode analyze itself uses "
    "(`sparse_codes`: the chunked TopK encode), i.e. what the statistics cost on top of it; variants alternate, "
    "medians. SAEs: the demo's TopK SAE (d_in 128, 2,048 latents, k 16) and a random 16k-latent TopK SAE (k 32) on "
    "the same store. Lazy reads: with the 16k-latent features file, the file bytes `FeatureDB` reads to open one "
    "latent card (after the database is open) over that latent's own stored bytes.")


if __name__ == "__main__":
    main()
