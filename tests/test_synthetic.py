"""Synthetic stores: readable, reproducible, rows = coefficients @ directions; structure; recovery metrics."""

import hashlib
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
    correlation_factors,
    feature_probs,
    feature_probs_by_id,
    hierarchy_ids,
    interference,
    load_truth,
    mmcs,
    planted,
    sample,
    splits,
    truth_codes,
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
                                dict(rows=10), dict(holdout=1.0), dict(dtype="int8"), dict(shard_rows=5),
                                dict(firing="pareto"), dict(firing="zipf", zipf_exponent=0.0),
                                dict(firing="zipf", zipf_exponent=-1.0), dict(correlation=1.0),
                                dict(correlation=-0.1), dict(correlation_rank=0), dict(superposition=-1.0),
                                dict(superposition=2.0), dict(n_true=256, superposition=0.01),
                                dict(firing="zipf", zipf_exponent=4.0), dict(firing="zipf", zipf_exponent=10.0,
                                                                              active=0.5)])
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


def _coef_digest(cfg, sizes=(2048, 1000)) -> str:
    dirs, gen = planted(cfg)
    h = hashlib.sha256()
    for n in sizes:
        c = sample(cfg, n, gen, dirs)[1].coalesce()
        h.update(c.indices().numpy().tobytes())
        h.update(c.values().numpy().tobytes())
    return h.hexdigest()[:16]


def test_defaults_draw_what_they_drew_before(tmp_path):
    """The new options (--firing, --correlation, --superposition) at their defaults leave the draws as they were,
    so stores written before them keep their truth. The digests are of the code before those options (commit
    f1ec1e8: sha256 of the coefficients' indices and values of two sample calls, printed by this helper); a store
    of that code (`saelab synthetic --rows 4096 --hierarchy 2 --bidirectional 3`) was also compared row for row."""
    assert _coef_digest(_cfg(tmp_path / "u")) == "84fedf8d212a3965"
    assert _coef_digest(_cfg(tmp_path / "u", exclusive_children=True, seed=3)) == "7c663c0a6fbdda26"


def _rates(cfg, n):
    dirs, gen = planted(cfg)
    c = sample(cfg, n, gen, dirs)[1].coalesce()
    on = torch.zeros(n, cfg.n_true, dtype=torch.bool)
    on[c.indices()[0], c.indices()[1]] = True
    return on


def test_zipf_frequencies_follow_the_planted_law(tmp_path):
    cfg = _cfg(tmp_path / "z", n_true=64, hierarchy=4, children=4, bidirectional=4, firing="zipf").validate()
    n = 200_000
    on = _rates(cfg, n)
    want = torch.tensor(feature_probs_by_id(cfg), dtype=torch.float64)
    kids = [k for ks in hierarchy_ids(cfg).values() for k in ks]
    free = [i for i in range(cfg.n_true) if i not in kids]
    freq = on.double().mean(0)
    assert np.corrcoef(freq[free].log().numpy(), want[free].log().numpy())[0, 1] > 0.95
    assert ((freq[free] - want[free]).abs() < 5 * (want[free] / n).sqrt() + 1e-4).all()
    assert abs(on.sum(1).double().mean().item() - cfg.active) < 0.03 * cfg.active
    assert want[free].max() / want[free].min() > 10  # it is not uniform
    for p, ks in hierarchy_ids(cfg).items():  # children: their rate given the parent, as before
        assert abs(on[on[:, p]][:, ks].double().mean().item() - cfg.child_rate) < 0.05
    # the ranks are a seeded permutation: the most frequent feature is not id 0, and moves with the seed
    top = [int(feature_probs(_cfg(tmp_path / "z", n_true=64, firing="zipf", seed=s)).argmax()) for s in (0, 1)]
    assert top[0] != top[1] and top != [0, 0]
    assert int(freq.argmax()) == int(want.argmax())


def test_correlated_features_fire_together(tmp_path):
    base = dict(n_true=48, hierarchy=2, children=2, bidirectional=4, active=4.0)
    n = 30_000
    cfg = _cfg(tmp_path / "c", correlation=0.6, correlation_rank=2, **base).validate()
    f = correlation_factors(cfg)
    load = f.T @ f
    load.fill_diagonal_(-2)
    i, j = divmod(int(load.argmax()), load.shape[1])  # free indices sharing the most loading
    h, c = cfg.hierarchy, cfg.children
    i, j = (k if k < h else k + h * c for k in (i, j))  # their feature ids

    def indicator_corr(config):
        on = _rates(config, n).double()
        return float(np.corrcoef(on[:, i].numpy(), on[:, j].numpy())[0, 1]), on

    r, on = indicator_corr(cfg)
    r0, _ = indicator_corr(_cfg(tmp_path / "c", **base))
    assert r > 0.15 and abs(r0) < 0.05, (r, r0)
    want = torch.tensor(feature_probs_by_id(cfg), dtype=torch.float64)
    kids = [k for ks in hierarchy_ids(cfg).values() for k in ks]
    free = [k for k in range(cfg.n_true) if k not in kids]
    assert ((on.mean(0)[free] - want[free]).abs() < 6 * (want[free] / n).sqrt()).all()
    assert abs(on.sum(1).mean().item() - cfg.active) < 0.03 * cfg.active
    # zipf and correlation together: the marginals are still the zipf law
    zc = _cfg(tmp_path / "c", firing="zipf", correlation=0.6, **base)
    on = _rates(zc, n).double()
    want = torch.tensor(feature_probs_by_id(zc), dtype=torch.float64)
    assert ((on.mean(0)[free] - want[free]).abs() < 6 * (want[free] / n).sqrt()).all()


def test_superposition_sets_n_true_and_truth_records_interference(tmp_path, monkeypatch):
    from saelab import synthetic

    cfg = _cfg(tmp_path / "s", n_true=256, superposition=2.5, d=16, rows=4 * CONTEXT_SIZE, hierarchy=0,
               bidirectional=0)
    assert cfg.n_true == 40
    out = write_synthetic(cfg, progress=False)
    truth, info = load_truth(out)
    assert truth.shape == (40, 16) and info["superposition"] == 2.5
    cos = (truth @ truth.T).abs().fill_diagonal_(0)
    assert info["interference"] == pytest.approx(float(cos.max(1).values.mean()), abs=1e-6)
    assert 0 < info["interference"] < 1
    # a store of the recorded config is the same store again (n_true stays 40)
    assert SyntheticConfig.from_dict(info["config"]).validate().n_true == 40
    # any store records them; more features per dimension interfere more
    plain = load_truth(write_synthetic(_cfg(tmp_path / "p", rows=4 * CONTEXT_SIZE), progress=False))[1]
    assert plain["superposition"] == 128 / 32 and plain["firing"] == "uniform" and "feature_probs" not in plain
    assert interference(torch.eye(4)) == 0 and interference(truth[:1]) == 0
    monkeypatch.setattr(synthetic, "INTERFERENCE_WORK", 40 * 40 * (16 + 32) // 3)  # every 3rd direction: 14 of 40
    assert interference(truth) == pytest.approx(float(cos.max(1).values[::3].mean()), abs=1e-6)
    with pytest.raises(SaelabError, match="pass one of them"):
        _cfg(tmp_path / "b", n_true=100, superposition=2.0).validate()


def test_truth_codes_redraw_a_zipf_correlated_store(tmp_path, monkeypatch):
    from saelab import synthetic

    monkeypatch.setattr(synthetic, "chunk_rows", lambda cfg: 3 * CONTEXT_SIZE)  # several chunks and copula blocks
    cfg = _cfg(tmp_path / "zc", rows=12 * CONTEXT_SIZE, firing="zipf", zipf_exponent=0.9, correlation=0.4,
               correlation_rank=3)
    out = write_synthetic(cfg, progress=False)
    info = json.loads((out / "truth.json").read_text())
    assert info["firing"] == "zipf" and len(info["feature_probs"]) == cfg.n_true
    assert info["correlation"]["rank"] == 3 and isinstance(info["correlation"]["factor_seed"], int)
    assert info["feature_prob"] == pytest.approx(float(feature_probs(cfg).mean()))
    store = ActivationStore(out)
    ids = np.arange(store.n_rows("all"))
    coef, x = truth_codes(out, ids)
    assert torch.equal(x, store.rows(ids))
    assert torch.allclose(coef @ load_truth(out)[0], x, atol=1e-5)
    back = np.array([5 * CONTEXT_SIZE + 7, 3, 11 * CONTEXT_SIZE])  # any rows, in any order
    assert torch.equal(truth_codes(out, back)[0], coef[back])


def test_orthogonal_children_are_orthogonal_to_their_parents_and_draw_nothing(tmp_path):
    """--orthogonal-children: each child's direction is unit-norm and orthogonal to its parent's; every other
    direction, and the rows' coefficients, are those of the same store without it (it draws nothing); the written
    store's rows are its coefficients times its own directions (truth_codes redraws them)."""
    plain, orth = _cfg(tmp_path / "p"), _cfg(tmp_path / "o", orthogonal_children=True, rows=12 * CONTEXT_SIZE)
    (d0, g0), (d1, g1) = planted(plain), planted(orth.validate())
    kids = [k for ks in hierarchy_ids(orth).values() for k in ks]
    others = [i for i in range(orth.n_true) if i not in kids]
    assert torch.equal(d0[others], d1[others]) and not torch.equal(d0[kids], d1[kids])
    assert torch.allclose(d1.norm(dim=1), torch.ones(orth.n_true), atol=1e-6)
    for p, ks in hierarchy_ids(orth).items():
        assert (d1[ks] @ d1[p]).abs().max() < 1e-6
        assert (d0[ks] @ d0[p]).abs().max() > 1e-3  # the random draw was not orthogonal already
        assert (d1[ks] * d0[ks]).sum(1).min() > 0.9  # the same direction, its parent's part removed
    c0, c1 = sample(plain, 3000, g0, d0)[1], sample(orth, 3000, g1, d1)[1]
    assert torch.equal(c0.coalesce().indices(), c1.coalesce().indices())
    assert torch.equal(c0.coalesce().values(), c1.coalesce().values())
    out = write_synthetic(orth, progress=False)
    assert json.loads((out / "truth.json").read_text())["config"]["orthogonal_children"] is True
    ids = np.arange(ActivationStore(out).n_rows("all"))
    coef, x = truth_codes(out, ids)
    assert torch.equal(x, ActivationStore(out).rows(ids))
    assert torch.allclose(coef @ load_truth(out)[0], x, atol=1e-5)
    for kw in (dict(hierarchy=0), dict(children=0), dict(d=1, n_true=20, bidirectional=0, hierarchy=2, children=2,
                                                          active=2.0)):
        with pytest.raises(SaelabError, match="--orthogonal-children") as e:
            _cfg(tmp_path / "x", orthogonal_children=True, **kw).validate()
        assert "\n" not in str(e.value)
