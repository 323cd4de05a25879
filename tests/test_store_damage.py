"""A store whose manifest disagrees with itself or with its shards, and a synthetic store that cannot be written:
each is one line from the CLI before anything runs (they were tracebacks, hangs, or exit 0 on wrong data)."""

import json
import shutil

import pytest

from saelab.errors import SaelabError
from tests.test_outputs import _fails

FIX = "restore it or harvest the store again"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """4 shards of 2 contexts (the last held out), d=8."""
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("damage") / "store"
    return write_synthetic(SyntheticConfig(out=str(out), d=8, n_true=16, rows=1024, shard_rows=256, holdout=0.25),
                           progress=False)


def _damaged(tiny_store, tmp_path, edit):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))
    return store


def _drop(key, i=0):
    return lambda m: m["shards"][i].pop(key)


def _set(key, value, i=0):
    return lambda m: m["shards"][i].__setitem__(key, value)


@pytest.mark.parametrize("edit,needle", [
    (_drop("sha256"), "shards[0]: 'sha256' is a required property"),
    (_drop("first_row", 2), "shards[2]: 'first_row' is a required property"),
    (_set("first_row", 300, 1), "shards[1].first_row: 300 is not 256, the rows of the shards before it"),
    (_set("first_row", 5, 0), "shards[0].first_row: 5 is not 0"),
    (_set("rows", 10**15), "shards[1].first_row: 256 is not 1000000000000000"),
    (lambda m: m.update(context_size=100), "shards[0].rows: 256 is not a whole number of contexts of context_size 100"),
    (lambda m: m.update(n_tokens=1000), "n_tokens: 1000 is not 1024, the rows of its shards"),
    (lambda m: m["shards"].insert(1, dict(m["shards"][0], first_row=256)),
     "shards[1].file: 'shard_00000.h5' is listed twice"),
    (lambda m: m.update(dtype="bfloat16"), "dtype: 'bfloat16' is not one of ['float32', 'float16']"),
])
def test_a_manifest_that_disagrees_with_itself_is_one_line(tiny_store, tmp_path, capsys, edit, needle):
    """Each of these was accepted by read_manifest and then crashed (KeyError, StopIteration), hung (a list of
    10**15 / 4096 blocks) or ran on a wrong context layout; now train refuses it naming the file and the field."""
    store = _damaged(tiny_store, tmp_path, edit)
    err = _fails(["train", "--activations", store, "--out", tmp_path / "sae", "--tokens", 512, "--batch-size", 128, "--width", 64, "--k", 4,
                  "--quiet"], capsys, needle)
    assert "manifest.json is not a valid store manifest: " in err and err.endswith(FIX), err
    assert not (tmp_path / "sae").exists()


def test_every_manifest_saelab_writes_holds(tiny_store, tmp_path):
    """The checks hold for a store being written (complete false, after each shard) and after a resume."""
    from saelab.store import ShardWriter, read_manifest
    from saelab.store.manifest import layout_problem

    assert layout_problem(read_manifest(tiny_store)) is None
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    w = ShardWriter.resume(store, 2)
    assert read_manifest(store)["complete"] is False and len(read_manifest(store)["shards"]) == 2
    import numpy as np

    w.write_shard(np.zeros((128, 8), np.float32), np.zeros((1, 128), np.int32), holdout=True)
    m = read_manifest(store)
    assert m["n_tokens"] == 2 * 256 + 128 and m["shards"][-1]["first_row"] == 512


def test_a_shard_of_another_dtype_than_the_manifest_is_refused(tiny_store, tmp_path, capsys):
    """A manifest saying float16 over float32 shards: one line when a shard opens, not rows read as the wrong
    type."""
    from saelab.store import ActivationStore

    store = _damaged(tiny_store, tmp_path, lambda m: m.update(dtype="float16"))
    _fails(["train", "--activations", store, "--out", tmp_path / "sae", "--tokens", 512, "--batch-size", 128, "--width", 64, "--k", 4, "--quiet"],
           capsys, "holds float32 rows, manifest says dtype float16: harvest the store again")
    with pytest.raises(SaelabError, match="holds float32 rows, manifest says dtype float16"):
        ActivationStore(store, verify=False).rows([0])


@pytest.mark.parametrize("rows", [100_000_000_000, 4611686018427387904])
def test_a_synthetic_store_too_big_for_the_disk_is_refused_up_front(tmp_path, capsys, rows):
    """Rows × d × itemsize over the free space: one line naming both sizes, nothing written (25 TB were started;
    2**62 rows hung building the shard plan)."""
    out = tmp_path / "syn"
    _fails(["synthetic", "--out", out, "--rows", rows, "--quiet"], capsys, "GiB free: free space, pass a smaller --rows")
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["--active", "1e-300", "--rows", "256"], "expects 2.56e-298 firing features in the whole store (active × rows)"),
    (["--active", "1e-12", "--rows", "2560"], "expects 2.56e-09 firing features in the whole store"),
    (["--active", "1e-13", "--rows", "100000000000000", "--n-true", "1000"],
     "firing probability of 1e-16, under 1e-15"),
])
def test_an_active_rate_that_writes_nothing_is_refused(tmp_path, capsys, argv, needle):
    """Too few firings for the store (an all-zero store was written) or a firing probability the geometric gap
    sampler overflows on (a RuntimeError traceback): one line before anything is written."""
    out = tmp_path / "syn"
    _fails(["synthetic", "--out", out, *argv, "--quiet"], capsys, needle)
    assert not out.exists()


def test_the_least_firing_probability_samples_finitely():
    """At the floor the gaps stay in int64: rows come out, none of them garbage."""
    from saelab.synthetic import MIN_PROB, SyntheticConfig, feature_prob, planted, sample

    cfg = SyntheticConfig(out="unused", active=MIN_PROB * 16, n_true=16, d=8, rows=10**16).validate()
    assert feature_prob(cfg) == pytest.approx(MIN_PROB)
    directions, gen = planted(cfg)
    x, coeffs = sample(cfg, 4096, gen, directions)
    assert x.shape == (4096, 8) and coeffs._nnz() == 0
