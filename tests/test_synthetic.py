"""Synthetic stores: readable, reproducible, rows = coefficients @ directions; structure; recovery metrics."""

import json

import numpy as np
import pytest
import torch

from saelab.errors import SaelabError
from saelab.store import ActivationStore, read_manifest
from saelab.synthetic import (
    CONTEXT_SIZE,
    SyntheticConfig,
    bidirectional_ids,
    chunk_rows,
    hierarchy_ids,
    load_truth,
    mmcs,
    planted,
    sample,
    splits,
    write_synthetic,
)

pytestmark = pytest.mark.tl3


def _cfg(out, **kw):
    base = dict(out=str(out), d=32, n_true=128, active=4.0, rows=40 * CONTEXT_SIZE + 50, shard_rows=8 * CONTEXT_SIZE,
                holdout=0.1, bidirectional=8, hierarchy=4, children=3, seed=0)
    return SyntheticConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("syn") / "a")
    return cfg, write_synthetic(cfg, progress=False)


def test_store_opens_and_splits_cover_rows(written):
    cfg, out = written
    store = ActivationStore(out)
    m = read_manifest(out)
    got = (m["model"], m["hook"], m["d_in"], m["bos_included"], m["complete"])
    assert got == ("synthetic", "synthetic", 32, False, True)
    assert store.n_rows("train") + store.n_rows("holdout") == (cfg.rows // CONTEXT_SIZE) * CONTEXT_SIZE
    assert store.n_rows("holdout") == 4 * CONTEXT_SIZE and m["holdout_shards"] == [m["shards"][-1]["file"]]
    assert store.tokens("all").shape == (40, CONTEXT_SIZE) and not store.tokens("all").any()
    assert next(iter(store.batches(64, split="holdout"))).shape == (64, 32)
    truth, info = load_truth(out)
    assert truth.shape == (128, 32) and torch.allclose(truth.norm(dim=1), torch.ones(128))
    assert info["bidirectional"] == bidirectional_ids(cfg) and info["hierarchy"] == hierarchy_ids(cfg)
    assert json.loads((out / "truth.json").read_text())["seed"] == 0


def test_rows_equal_coefficients_at_directions(written):
    cfg, out = written
    dirs, gen = planted(cfg)
    assert np.array_equal(np.load(out / "truth.npy", allow_pickle=False), dirs.numpy())
    n = min(chunk_rows(cfg), 40 * CONTEXT_SIZE)
    x, coeffs = sample(cfg, n, gen, dirs)
    stored = ActivationStore(out).rows(np.arange(n))
    assert torch.equal(stored, x)
    assert torch.allclose(coeffs.to_dense() @ dirs, stored, atol=1e-5)
    assert abs(coeffs._nnz() / n - cfg.active) < 0.3


def test_chunks_stitch_across_shards(tmp_path, monkeypatch):
    from saelab import synthetic

    monkeypatch.setattr(synthetic, "chunk_rows", lambda cfg: 3 * CONTEXT_SIZE)  # not aligned with 8-context shards
    cfg = _cfg(tmp_path / "s", rows=20 * CONTEXT_SIZE, hierarchy=0, bidirectional=0)
    store = ActivationStore(write_synthetic(cfg, progress=False))
    dirs, gen = planted(cfg)
    want = torch.cat([sample(cfg, min(3 * CONTEXT_SIZE, store.n_rows("all") - a), gen, dirs)[0]
                      for a in range(0, store.n_rows("all"), 3 * CONTEXT_SIZE)])
    assert torch.equal(store.rows(np.arange(store.n_rows("all"))), want)


def test_seed_reproduces_bytes(written, tmp_path):
    cfg, out = written
    sums = lambda p: [s["sha256"] for s in read_manifest(p)["shards"]]  # noqa: E731
    same = write_synthetic(_cfg(tmp_path / "same"), progress=False)
    other = write_synthetic(_cfg(tmp_path / "other", seed=1), progress=False)
    assert sums(same) == sums(out)
    assert all(a != b for a, b in zip(sums(other), sums(out)))


def test_children_need_parents_and_bidirectional_has_both_signs(tmp_path):
    cfg = _cfg(tmp_path / "unused", active=8.0)
    dirs, gen = planted(cfg)
    c = sample(cfg, 20000, gen, dirs)[1].to_dense()
    for parent, kids in hierarchy_ids(cfg).items():
        on = c[:, parent] != 0
        assert (c[~on][:, kids] == 0).all()
        rate = (c[on][:, kids] != 0).float().mean().item()
        assert 0.4 < rate < 0.6 and (c[:, kids] != 0).any()
    bi = bidirectional_ids(cfg)
    assert ((c[:, bi] > 0).any(0) & (c[:, bi] < 0).any(0)).all()
    plain = [i for i in range(cfg.n_true) if i not in bi]
    assert (c[:, plain] >= 0).all()


def test_metrics():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(256, 64, generator=g)
    assert mmcs(truth, truth) == pytest.approx(1.0, abs=1e-5)
    assert mmcs(torch.randn(512, 64, generator=g), truth) < 0.6
    assert mmcs(-truth, truth) < 0.6 and mmcs(-truth, truth, signed_ids=set(range(256))) == pytest.approx(1.0, abs=1e-5)
    dec = torch.cat([truth, truth[:1] * 3])
    s = splits(dec, truth)
    assert s[0] == 2 and (s[1:] == 1).all()


@pytest.mark.parametrize("kw", [dict(d=0), dict(active=200.0), dict(bidirectional=100, hierarchy=10),
                                dict(rows=10), dict(holdout=1.0), dict(dtype="int8"), dict(shard_rows=5)])
def test_validate_errors_are_one_line(tmp_path, kw):
    with pytest.raises(SaelabError) as e:
        _cfg(tmp_path / "x", **kw).validate()
    assert "\n" not in str(e.value)


def test_refuses_existing_out(written):
    with pytest.raises(SaelabError, match="exists: choose a new --out or delete it"):
        write_synthetic(written[0], progress=False)


@pytest.mark.parametrize("existed", [False, True])
def test_an_interrupted_synthetic_store_leaves_nothing(existed, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or any failure) while writing: the half store is removed (a store is rebuilt from its seed, and
    synthetic has no --resume); an --out that existed empty is left empty."""
    from saelab import synthetic as S
    from saelab.cli import main
    from saelab.store import ShardWriter

    calls = []
    real = ShardWriter.write_shard

    def write_then_interrupt(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(S.ShardWriter, "write_shard", write_then_interrupt)
    out = tmp_path / "syn"
    if existed:
        out.mkdir()
    assert main(["synthetic", "--out", str(out), "--d", "16", "--n-true", "32", "--rows", "8192",
                 "--shard-rows", "2048", "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(calls) == 2
    assert (out.is_dir() and not any(out.iterdir())) if existed else not out.exists()
