"""Stores bigger than memory: the peak resident memory of `saelab train`, `eval` and `analyze` over a
store 4× larger stays within 10% of the same command over the 1× store (measured as VmHWM of
the command's own process, so the OS page cache does not count).

`saelab eval` and `saelab analyze` run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``),
so their peak counts saelab's allocations and not the heap glibc keeps once its adaptive threshold
has risen: with that threshold free to move, eval's peak over the same 1× store ranged 349-387 MB
between identical runs (over the 4× store 376-393 MB), and one CI run failed the 10% bound on that
noise alone; fixed, the 1× and 4× peaks were 322-323 and 323-324 MB (3 runs each), so one run per
store is enough (ratios 4×/1× in two runs: eval 1.004, analyze 1.021-1.023). `saelab train` keeps
the default allocator: its test guards the shuffle buffers' `malloc_trim`, whose regression is
exactly glibc keeping freed buffers on its heap, which a fixed threshold would hide."""

import json
import os
import subprocess
import sys

import pytest

# runs the CLI in this process, then prints its peak RSS (VmHWM, kB)
WRAPPER = """
import sys
from saelab.cli import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("VMHWM_KB", hwm, flush=True)
sys.exit(rc)
"""
ROWS = 32768  # 1×: 32,768 rows × d_in 512 × 4 bytes = 64 MiB; 4×: 256 MiB
BUFFER = 8192  # shuffle buffer rows (≈ 16 MiB at d_in 512), well below either store


def _peak_kb(*args, fixed_mmap: bool = True) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"MALLOC_MMAP_THRESHOLD_": "131072"} if fixed_mmap else {})}
    r = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split("VMHWM_KB")[1].split()[0])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    root = tmp_path_factory.mktemp("mem")
    return {m: write_synthetic(SyntheticConfig(out=str(root / f"x{m}"), d=512, n_true=2048, active=8, rows=m * ROWS,
                                               shard_rows=8192, holdout=0.25), progress=False)
            for m in (1, 4)}


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    """{multiple: (peak kB, SAE folder)} of one epoch of training over each store."""
    root = tmp_path_factory.mktemp("memruns")
    res = {}
    for m, store in stores.items():
        out = root / f"sae{m}"
        kb = _peak_kb("train", "--activations", str(store), "--out", str(out), "--arch", "topk", "--k", "8",
                      "--width", "512", "--batch-size", "2048", "--buffer-rows", str(BUFFER), "--quiet", fixed_mmap=False)
        res[m] = kb, out
    return res


def test_training_memory_flat_in_store_size(trained):
    (kb1, out1), (kb4, out4) = trained[1], trained[4]
    ev1, ev4 = (json.loads((o / "eval.json").read_text()) for o in (out1, out4))
    assert ev1["epochs"] >= 0.99 and ev4["epochs"] >= 0.99  # each run streamed its whole store
    assert ev4["tokens"] >= 3.9 * ev1["tokens"]
    assert kb4 <= 1.10 * kb1, (kb1, kb4)


def test_eval_memory_flat_in_store_size(trained, stores):
    sae = trained[1][1]
    kb = {}
    for m, store in stores.items():
        kb[m] = _peak_kb("eval", "--sae", str(sae), "--activations", str(store), "--quiet")
        rows = json.loads((sae / "eval.json").read_text())["rows"]
        assert rows >= 0.24 * m * ROWS  # the whole held-out quarter of the store was read
    assert kb[4] <= 1.10 * kb[1], kb


def test_analyze_memory_flat_in_store_size(trained, stores, tmp_path):
    """`saelab analyze` (one streaming pass, per-latent buffers sized by d_sae) over the 4× store
    peaks within 10% of the same pass over the 1× store."""
    import shutil

    from saelab.analysis.features.db import FeatureDB

    kb = {}
    for m, store in stores.items():
        sae = tmp_path / f"sae{m}"
        shutil.copytree(trained[1][1], sae)  # the same SAE, analysed over each store
        kb[m] = _peak_kb("analyze", "--sae", str(sae), "--activations", str(store), "--quiet")
        db = FeatureDB(sae)
        assert db.n_rows >= 0.99 * m * ROWS * 0.75  # the whole train part (at least) was streamed
        db.close()
    assert kb[4] <= 1.10 * kb[1], kb
