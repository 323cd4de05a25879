"""ActivationStore streaming: coverage, held-out split, reshuffling, resumable state."""

import numpy as np
import pytest
import torch

from saelab.errors import SaelabError
from saelab.store import ActivationStore

pytestmark = pytest.mark.tl3


@pytest.fixture(scope="module")
def store(small_run):
    return ActivationStore(small_run[1]["blocks.0.hook_resid_post"])


def _key(x):
    return [tuple(r) for r in x.numpy().round(6)]


def test_one_epoch_covers_train_rows_once(store):
    n_train = store.n_rows("train")
    got = torch.cat(list(store.batches(100, buffer_rows=1024, seed=3)))
    assert got.shape == (n_train, store.d_in)
    ref = store.rows(np.arange(n_train))  # training shards come first
    assert sorted(_key(got)) == sorted(_key(ref))
    assert not torch.equal(got, ref)  # shuffled
    held = torch.cat(list(store.batches(100, split="holdout", shuffle=False)))
    assert torch.equal(held, store.rows(np.arange(n_train, store.n_rows("all"))))


def test_epochs_reshuffle_and_resume(store):
    n = store.n_rows("train")
    it = store.batches(96, tokens=3 * n, buffer_rows=1024, seed=1)
    batches = list(it)
    assert sum(len(b) for b in batches) == 3 * n and it.epochs == 3
    e0 = torch.cat(batches)[:n]
    e1 = torch.cat(batches)[n : 2 * n]
    assert not torch.equal(e0, e1) and sorted(_key(e0)) == sorted(_key(e1))
    it2 = store.batches(96, tokens=3 * n, buffer_rows=1024, seed=1)
    for _ in range(7):
        next(it2)
    state = it2.state_dict()
    it3 = store.batches(96, tokens=3 * n, buffer_rows=1024, seed=1)
    it3.load_state_dict(state)
    rest = list(it3)
    assert len(rest) == len(batches) - 7
    for a, b in zip(rest, batches[7:]):
        assert torch.equal(a, b)


def test_skip_bos_and_contexts(store):
    ctx = store.context_size
    got = torch.cat(list(store.batches(128, skip_bos=True, shuffle=False)))
    n = store.n_rows("train")
    keep = np.arange(n)[np.arange(n) % ctx != 0]
    assert torch.equal(got, store.rows(keep))
    toks, pos = store.context(ctx + 5)
    assert pos == 5 and toks.shape == (ctx,) and np.array_equal(toks, store.tokens()[1])


@pytest.mark.parametrize("kw", [dict(batch_size=100, buffer_rows=1024, skip_bos=True),
                                dict(batch_size=97, tokens=2 * 6000 + 13, buffer_rows=2048),
                                dict(batch_size=50, shuffle=False)])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_parts_rebuild_the_batches_and_read_only_their_slice(store, kw, world):
    """part=(r, world): the ranks' batches, concatenated, are the single-process batches (short last
    batch, epochs, skip_bos, unshuffled included); each rank holds only its rows of a buffer; resume."""
    one = list(store.batches(seed=5, **kw))
    its = [store.batches(seed=5, part=(r, world), **kw) for r in range(world)]
    for i, b in enumerate(one):
        parts = [next(it) for it in its]
        assert torch.equal(torch.cat(parts), b), i
        if i == 0:
            held = [len(it._buf[3][0]) for it in its]
            group_rows = its[0]._plan(0)[0][1]
            assert sum(held) == group_rows and max(held) <= group_rows // world + kw["batch_size"], held
    assert all(next(it, None) is None for it in its)
    it = store.batches(seed=5, part=(world - 1, world), **kw)
    for _ in range(5):
        next(it)
    again = store.batches(seed=5, part=(world - 1, world), **kw)
    again.load_state_dict(it.state_dict())
    assert torch.equal(next(again), next(it))


@pytest.mark.parametrize("change,needle", [
    (None, "manifest.json is not a valid store manifest: the top level: None is not an object"),
    ({"context_size": 0}, "manifest.json is not a valid store manifest: context_size: 0 is less than the minimum of 1"),
    ({"d_in": "abc"}, "manifest.json is not a valid store manifest: d_in: 'abc' is not a whole number"),
    ({"dtype": "int8"}, "manifest.json is not a valid store manifest: dtype: 'int8' is not one of ['float32'"),
    ({"shards": None}, "manifest.json is not a valid store manifest: shards: None is not a list"),
    ({"holdout_shards": ["elsewhere.h5"]}, "holdout_shards: 'elsewhere.h5' is not one of its shards"),
])
def test_a_manifest_with_bad_values_is_one_line(change, needle, tmp_path):
    """A manifest of the right keys but bad values: one SaelabError when the store opens (they were TypeError /
    ZeroDivisionError tracebacks in train and eval)."""
    import json

    from saelab.synthetic import SyntheticConfig, write_synthetic

    path = write_synthetic(SyntheticConfig(out=str(tmp_path / "s"), d=8, n_true=16, rows=1024), progress=False)
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(None if change is None else {**m, **change}))
    with pytest.raises(SaelabError) as e:
        ActivationStore(path)
    assert needle in str(e.value) and "harvest the store again" in str(e.value), str(e.value)
