"""saelab analyze / FeatureDB / labels: the features file against a brute-force computation,
lazy per-latent reads, bad input, labels, groups, signed and Matryoshka SAEs."""

import json
import math
import pathlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from saelab.analysis.features.accumulate import TopBuffer
from saelab.analysis.features.build import MAX_TOP, analyze
from saelab.analysis.features.codes import Batch
from saelab.analysis.features.db import FeatureDB
from saelab.analysis.features.labels import load_labels, save_label
from saelab.analysis.features.records import PER_LATENT, WINDOW
from saelab.errors import SaelabError
from saelab.layout import FEATURES_FILE
from saelab.targets import sae_folders

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESID = "blocks.0.hook_resid_post"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "saelab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def train_sae(activations, out, arch="topk", hook=None, **kw):
    from saelab.config import SAEConfig, TrainConfig
    from saelab.train import train

    scfg = SAEConfig(arch=arch, k=kw.pop("k", 8), width=kw.pop("width", 256), **kw)
    tcfg = TrainConfig(activations=str(activations), out=str(out), hook=hook, tokens=8192, batch_size=1024,
                       log_every=1000, checkpoint_every=10_000)
    return train(tcfg, scfg, progress=False)


@pytest.fixture(scope="session")
def resid_store(small_run):
    _, stores = small_run
    return stores[RESID]


@pytest.fixture(scope="session")
def topk_sae(resid_store, tmp_path_factory):
    """A TopK SAE trained briefly on the small store, analysed through the CLI (--top 5)."""
    out = tmp_path_factory.mktemp("an") / "topk"
    train_sae(resid_store, out)
    r = cli("analyze", "--sae", out, "--top", 5, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "latents alive" in r.stdout and str(out / FEATURES_FILE) in r.stdout
    return out


def brute_force(sae_dir, store_path):
    """Dense codes [rows, d_sae] of every non-BOS row of the store (plain sae.encode) and their row ids."""
    from saelab.sae.base import SAE
    from saelab.store import ActivationStore

    sae = SAE.load(sae_dir)
    store = ActivationStore(store_path)
    n = store.n_rows("all")
    with torch.no_grad():
        f = sae.encode(store.rows(np.arange(n)))
    rows = np.arange(n)
    keep = rows % store.context_size != 0
    return sae, store, f[keep].numpy(), rows[keep]


def test_features_equal_brute_force(topk_sae, resid_store, tiny):
    sae, store, f, rows = brute_force(topk_sae, resid_store)
    db = FeatureDB(topk_sae)
    assert db.d_sae == sae.d_sae and db.hook == RESID and not db.signed and db.n_rows == len(rows)
    nz = f != 0
    np.testing.assert_allclose(db.density, nz.mean(0), rtol=0, atol=1e-12)
    fired = nz.any(0)
    assert fired.sum() > 20
    mean = np.where(fired, f.sum(0) / np.maximum(nz.sum(0), 1), 0)
    np.testing.assert_allclose(db.mean_act, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db.max_act, np.where(fired, f.max(0), 0), rtol=1e-5, atol=1e-6)
    edges = db.hist_edges
    Wn = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    cos = (Wn @ Wn.T).numpy()
    np.fill_diagonal(cos, -np.inf)
    W_U = tiny.W_U.detach()
    checked = 0
    for i in np.nonzero(fired)[0][:: max(1, fired.sum() // 6)]:
        i = int(i)
        c = db.card(i)
        # histogram: counts of non-zero |act| per stored log bin
        vals = f[nz[:, i], i]
        counts = np.bincount(np.searchsorted(edges[1:-1], np.abs(vals), side="right"), minlength=len(edges) - 1)
        lo = np.nonzero(counts)[0][0]
        assert c.hist_counts == counts[lo : np.nonzero(counts)[0][-1] + 1].tolist()
        assert c.hist_edges[0] == pytest.approx(edges[lo])
        # top examples: the same rows and values as sorting the dense codes
        order = np.argsort(-f[:, i], kind="stable")[: len(c.top)]
        expect = [(int(rows[j]), float(f[j, i])) for j in order if f[j, i] > 0]
        assert len(c.top) == min(5, len(vals))
        assert [e.row for e in c.top] == [r for r, _ in expect]
        np.testing.assert_allclose([e.value for e in c.top], [v for _, v in expect], rtol=1e-5)
        for e in c.top + [x for _, band in c.quantiles for x in band]:
            # the window: the context's tokens around the row, this latent's act on each of them
            ctx_tokens, p = store.context(e.row)
            start = p - e.pos
            ids = ctx_tokens[start : start + len(e.tokens)]
            assert e.tokens == [db.token_str(int(t)) for t in ids]
            assert e.acts[e.pos] == pytest.approx(e.value, rel=1e-5)
            with torch.no_grad():
                dense = sae.encode(store.rows(np.arange(e.row - p + start, e.row - p + start + len(e.tokens))))
            np.testing.assert_allclose(e.acts, dense[:, i].numpy(), rtol=1e-4, atol=1e-5)
        # quantile bands: each example lies in its band of the max
        for label, band in c.quantiles:
            lo_f, hi_f = (float(x) for x in label.split(" ")[0].split("–"))
            for e in band:
                assert lo_f * c.max_act - 1e-5 <= e.value <= hi_f * c.max_act + 1e-5
        assert sum(len(b) for _, b in c.quantiles) >= min(len(vals), 3)
        # logit effects: the decoder row, centred (final LN), through W_U
        d = sae.W_dec.detach()[i]
        logits = (d - d.mean()) @ W_U
        assert [t for t, _ in c.logits_top] == [db.token_str(int(t)) for t in logits.topk(10).indices]
        np.testing.assert_allclose([v for _, v in c.logits_top], logits.topk(10).values.numpy(), rtol=1e-4, atol=1e-5)
        assert [t for t, _ in c.logits_bottom] == [db.token_str(int(t)) for t in (-logits).topk(10).indices]
        # neighbours by decoder cosine
        nb = np.argsort(-cos[i], kind="stable")[:10]
        assert [j for j, _ in c.neighbours] == nb.tolist()
        np.testing.assert_allclose([x for _, x in c.neighbours], cos[i, nb], rtol=1e-5, atol=1e-6)
        assert c.group is None and c.top_negative == []
        checked += 1
    assert checked >= 5
    # by_token finds a latent through one of its promoted tokens
    c = db.card(int(np.nonzero(fired)[0][0]))
    tok = c.logits_top[0][0]
    assert c.latent in [j for j, _ in db.by_token(tok, n=db.d_sae)]
    assert db.by_token("no such token at all") == []
    db.close()


def test_card_reads_only_its_latent(topk_sae):
    with h5py.File(topk_sae / FEATURES_FILE) as f:
        names = [n for n in PER_LATENT if n in f]
        assert set(PER_LATENT) - set(names) == {"head_share"}  # attn.hook_z SAEs only
        for name in names:  # row-major contiguous: a latent's slice is one byte range
            assert f[name].chunks is None and f[name].compression is None, name
        own = sum(f[name][0].nbytes for name in names)
    db = FeatureDB(topk_sae)
    db.card(0)  # first card may read shared metadata
    for i in (7, db.d_sae - 1, 100):
        before = db.bytes_read
        db.card(i)
        assert own <= db.bytes_read - before <= 1.5 * own, (db.bytes_read - before, own)
    with pytest.raises(SaelabError, match="out of range"):
        db.card(db.d_sae)
    db.close()


def test_bad_input_one_line_errors(topk_sae, resid_store, small_run, tmp_path):
    not_sae = tmp_path / "empty"
    not_sae.mkdir()
    store_z = small_run[1]["blocks.1.attn.hook_z"]
    for args, words in [
        (("--sae", not_sae), "not an SAE folder"),
        (("--sae", topk_sae, "--activations", store_z), "pass --activations with a store of the SAE's hook"),
    ]:
        r = cli("analyze", *args, "--quiet", timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert words in r.stderr
    with pytest.raises(SaelabError, match="no such folder"):
        sae_folders(tmp_path / "nope")
    for top in (0, MAX_TOP + 1):  # --top 100000 wrote a 3.4 GB file for a 256-latent SAE
        with pytest.raises(SaelabError, match=f"--top must be between 1 and {MAX_TOP} \\(got {top}\\)"):
            analyze(topk_sae, top=top, progress=False)
    # a features file from another SAE (other weights, same shape; and other shape) is refused
    other = tmp_path / "other"
    shutil.copytree(topk_sae, other)
    from saelab.sae.base import SAE

    FeatureDB(other).close()  # the copy matches (and its weights' hash is now cached in this process)
    sae = SAE.load(other)
    with torch.no_grad():
        sae.W_dec[0] *= 2
    sae.save(other)
    with pytest.raises(SaelabError, match="another SAE.*saelab analyze --sae"):
        FeatureDB(other)
    wide = tmp_path / "wide"
    SAE.create("topk", d_in=128, d_sae=512, k=8, hook_name=RESID, model_name="tiny").save(wide)
    shutil.copy(topk_sae / FEATURES_FILE, wide / FEATURES_FILE)
    with pytest.raises(SaelabError, match="d_sae 256"):
        FeatureDB(wide)
    (wide / FEATURES_FILE).unlink()
    with pytest.raises(SaelabError, match="missing: run `saelab analyze"):
        FeatureDB(wide)
    for e in (pytest.raises(SaelabError),):
        with e as info:
            FeatureDB(wide)
        assert "\n" not in str(info.value)


def test_labels_round_trip(tmp_path):
    assert load_labels(tmp_path) == {}
    save_label(tmp_path, 5, "  the letter e ")
    save_label(tmp_path, 12, "names → «Lily»")
    assert load_labels(tmp_path) == {5: "the letter e", 12: "names → «Lily»"}
    save_label(tmp_path, 5, "")
    raw = json.loads((tmp_path / "labels.json").read_text(encoding="utf-8"))
    assert raw == {"12": "names → «Lily»"}
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]  # no temp file left behind
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(SaelabError, match="labels.json is not a valid labels file: not JSON"):
        load_labels(tmp_path)
    for bad, needle in (('{"x": "a"}', "'x' is not a latent id"), ('{"3": 4}', r'\["3"\]: 4 is not text'),
                        ("[1]", "the top level: \\[1\\] is not an object")):
        (tmp_path / "labels.json").write_text(bad)
        with pytest.raises(SaelabError, match=needle):
            load_labels(tmp_path)


def test_label_of_a_latent_the_sae_does_not_have_is_refused(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"d_sae": 16, "d_in": 4}))
    save_label(tmp_path, 15, "last one")
    for bad in (16, -1):
        with pytest.raises(SaelabError, match=r"out of range: this SAE has latents 0\.\.15"):
            save_label(tmp_path, bad, "nowhere")
    assert load_labels(tmp_path) == {15: "last one"}


def test_group_folder_analyses_each_sae(small_run, tmp_path, tiny):
    cfg, stores = small_run
    out = tmp_path / "group"
    train_sae(cfg.out, out)  # one SAE per hook of the RUN folder: a group
    r = cli("analyze", "--sae", out, "--activations", cfg.out, "--tokens", 1000, "--top", 3, "--quiet")
    assert r.returncode == 0, r.stderr
    for hook in stores:
        db = FeatureDB(out / hook)
        assert db.hook == hook and db.n_rows == 1024 - 8  # rounded up to whole contexts, BOS left out
        c = db.card(int(np.argmax(db.density)))
        assert 1 <= len(c.top) <= 3
        assert len(c.logits_top) == 10  # hook_z too: through its layer's W_O
        if hook.endswith("attn.hook_z"):  # the decoder row per head through W_O, summed, centred, through W_U
            from saelab.sae.base import SAE

            W_O = tiny.blocks[int(hook.split(".")[1])].attn.W_O.detach()  # [n_heads, d_head, d_model]
            d = SAE.load(out / hook).W_dec.detach()[c.latent].reshape(W_O.shape[0], W_O.shape[1])
            r = torch.einsum("hd,hdm->m", d, W_O)
            logits = (r - r.mean()) @ tiny.W_U.detach()
            assert [t for t, _ in c.logits_top] == [db.token_str(int(t)) for t in logits.topk(10).indices]
            np.testing.assert_allclose([v for _, v in c.logits_top], logits.topk(10).values.numpy(), rtol=1e-4,
                                       atol=1e-5)
            # the heads the decoder row lives in: each head's share of its squared norm, largest first
            with h5py.File(out / hook / FEATURES_FILE) as f:  # stored like every per-latent array
                assert f["head_share"].shape == (db.d_sae, W_O.shape[0]) and f["head_share"].chunks is None
            share = (d ** 2).sum(-1) / (d ** 2).sum()
            want = sorted(((f"L1H{h}", float(x)) for h, x in enumerate(share)), key=lambda t: -t[1])
            assert [h for h, _ in c.heads] == [h for h, _ in want]
            np.testing.assert_allclose([x for _, x in c.heads], [x for _, x in want], rtol=1e-5)
        else:
            assert c.heads == []
        db.close()


def test_signed_sae_top_negative(resid_store, tmp_path, tiny):
    out = tmp_path / "abstopk"
    train_sae(resid_store, out, arch="abstopk")
    analyze(out, top=4, model=tiny, progress=False)
    sae, store, f, rows = brute_force(out, resid_store)
    db = FeatureDB(out)
    assert db.signed
    negs = np.nonzero((f < 0).any(0))[0]
    assert len(negs) > 0
    for i in negs[:5]:
        c = db.card(int(i))
        order = np.argsort(f[:, i], kind="stable")[: len(c.top_negative)]
        assert [e.row for e in c.top_negative] == [int(rows[j]) for j in order if f[j, i] < 0]
        assert all(e.value < 0 for e in c.top_negative)
        assert c.min_act == pytest.approx(float(f[:, i].min()), rel=1e-5)
        assert "max |act|" in c.quantiles[0][0]
    db.close()


def test_matryoshka_groups(resid_store, tmp_path, tiny):
    out = tmp_path / "mat"
    train_sae(resid_store, out, arch="matryoshka", matryoshka_prefixes=[0.25, 0.5, 1.0])
    analyze(out, top=3, model=tiny, progress=False, tokens=2048)
    db = FeatureDB(out)
    assert [db.card(i).group for i in (0, 63, 64, 127, 128, 255)] == [0, 0, 1, 1, 2, 2]
    db.close()


def test_top_buffer_equals_sort(tmp_path):
    """The batched running top-N (``TopBuffer``) against a full sort, on random batches with
    repeated slots, ties to empties and slots that never fill."""
    g = torch.Generator().manual_seed(0)
    slots, cap, W = 37, 6, WINDOW
    buf = TopBuffer(slots, cap, "cpu")
    allk, alls, allr = [], [], []
    r0 = 0
    for _ in range(12):
        n = int(torch.randint(1, 300, (1,), generator=g))
        slot = torch.randint(0, slots - 5, (n,), generator=g)  # the last 5 slots stay empty
        key = torch.randn(n, generator=g)
        toks = torch.randint(0, 100, (n,), generator=g)
        batch = Batch(torch.empty(0, dtype=torch.long), torch.empty(0), toks, r0, 10**6, slots)  # r0: a context start
        b = torch.arange(n)
        buf.offer(slot, key, key, b, slot, batch)
        allk.append(key)
        alls.append(slot)
        allr.append(b + r0)
        r0 += 10**6
    k, v, row, tok, _ = buf.sorted()
    K, S, R = torch.cat(allk), torch.cat(alls), torch.cat(allr)
    for s in range(slots):
        m = S == s
        expect = K[m].sort(descending=True).values[:cap]
        got = k[s][row[s] >= 0]
        assert torch.equal(got, expect)
        assert set(row[s][row[s] >= 0].tolist()) == set(R[m][K[m].argsort(descending=True)[:cap]].tolist())
        assert torch.equal(v[s][row[s] >= 0], expect)
    assert (row[-5:] == -1).all()


def test_saelens_folder(topk_sae, resid_store, tmp_path, tiny):
    """An SAE folder as SAELens writes it (no saelab config, no train.json): --activations is needed."""
    lens = tmp_path / "lens"
    lens.mkdir()
    cfg = json.loads((topk_sae / "cfg.json").read_text())
    cfg.pop("saelab")
    (lens / "cfg.json").write_text(json.dumps(cfg))
    shutil.copy(topk_sae / "sae_weights.safetensors", lens)
    with pytest.raises(SaelabError, match="pass --activations") as e:
        analyze(lens, model=tiny, progress=False)
    model = cfg.get("model_name") or cfg.get("metadata", {}).get("model_name")
    assert f"saelab harvest --model {model} --hook {RESID} --out activations/" in str(e.value), str(e.value)
    analyze(lens, resid_store, tokens=1024, model=tiny, progress=False)
    db = FeatureDB(lens)
    assert db.hook == RESID and db.n_rows == 1024 - 8
    db.close()


def test_demo_group_has_features(demo_group):
    """ensure_group() analyses each demo SAE, so the app, notebooks and tests find features.h5."""
    for hook, folder in demo_group.saes.items():
        with FeatureDB(folder) as db:
            assert db.hook == hook and db.n_rows > 100_000
            assert (db.density > 0).mean() > 0.9
            i = int(np.argmax(db.max_act))
            c = db.card(i)
            assert len(c.top) == 20 and c.top[0].value == pytest.approx(c.max_act)
            assert len(c.logits_top) == 10 and db.by_token(c.logits_top[0][0])


def test_synthetic_store_without_model(tmp_path):
    """A planted-feature store has no model: no logit effects, token ids shown as #id."""
    from saelab.sae.base import SAE
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "syn"), d=16, n_true=32, active=3, rows=4096),
                            progress=False)
    sae_dir = tmp_path / "sae"
    SAE.create("relu", d_in=16, d_sae=64, k=4, hook_name="synthetic").save(sae_dir)
    analyze(sae_dir, store, top=3, progress=False)
    with FeatureDB(sae_dir) as db:
        i = int(np.argmax(db.density))
        c = db.card(i)
        assert c.logits_top == [] and len(c.top) == 3 and c.density > 0
        assert not list(sae_dir.glob(".*.tmp"))


@pytest.mark.parametrize("cmd,resumable", [(["analyze", "--sae", "X"], False), (["train", "--activations", "X",
                                                                                 "--out", "Y"], True)])
def test_ctrl_c_message_names_resume_only_where_it_exists(cmd, resumable, monkeypatch, capsys):
    from saelab import cli
    from saelab.cli import analyze, train

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(*((analyze, "cmd_analyze") if cmd[0] == "analyze" else (train, "cmd_train")), interrupted)
    assert cli.main(cmd) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("saelab: interrupted") and ("--resume" in err) == resumable, err


def test_feature_db_on_a_group_folder_names_its_sae_folders(demo_group):
    """FeatureDB("runs/GROUP") says it is a group and lists the SAE folders to pass (it said "not an
    SAE folder ... or a group folder", as if a group folder were accepted)."""
    from saelab.analysis.features.db import FeatureDB

    with pytest.raises(SaelabError, match="is an SAE group, not one SAE") as e:
        FeatureDB(demo_group.group)
    assert str(demo_group.saes["blocks.0.hook_resid_post"]) in str(e.value)


def test_sae_folders_may_be_spelled_with_a_tilde(demo_group, monkeypatch):
    """SAE.load("~/runs/…") and FeatureDB("~/runs/…") expand the home folder, as load_group and
    write_circuit already did (they said "no such folder")."""
    from saelab.analysis.features.db import FeatureDB
    from saelab.sae.base import SAE

    sae_dir = demo_group.saes["blocks.1.hook_resid_post"]
    monkeypatch.setenv("HOME", str(sae_dir.parent))
    tilde = "~/" + sae_dir.name
    assert SAE.load(tilde).d_sae == SAE.load(sae_dir).d_sae
    with FeatureDB(tilde) as db:
        assert db.d_sae == SAE.load(sae_dir).d_sae


def test_neighbours_are_the_same_whatever_the_chunking():
    """geometry.neighbours against the full [d_sae, d_sae] cosine matrix (self excluded), with one latent per
    chunk, a ragged last chunk, and all latents at once."""
    from saelab.analysis.geometry import neighbours

    g = torch.Generator().manual_seed(0)
    W = torch.randn(53, 16, generator=g) * torch.rand(53, 1, generator=g)  # rows of unequal norms
    Wn = W / W.norm(dim=1, keepdim=True)
    S = Wn @ Wn.T
    S.fill_diagonal_(-math.inf)
    want_cos, want_ids = S.topk(10, dim=1)
    for budget in (53, 8 * 53, 1 << 25):
        ids, cos = neighbours(W, k=10, budget=budget)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(cos, want_cos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"])
def test_direct_logits_and_logit_effects_follow_the_formula(hook):
    """logit_lens.direct_logits (steering: a few directions) and logit_effects (analyze: every latent, in chunks of
    latents, no [d_in, vocab] matrix) are the one map (centre(d W_O) · w) @ W_U, checked on random weights with an
    unfolded LayerNorm scale and centring: relative error ≤ 1e-5, and logit_effects' top/bottom ids and values are
    those of the explicit [d_sae, vocab] matrix, whatever the chunking."""
    from types import SimpleNamespace

    from saelab.analysis.logit_lens import direct_logits, logit_effects
    from saelab.sae.base import SAE

    g = torch.Generator().manual_seed(0)
    n_heads, d_head, d_model, vocab = 4, 8, 32, 50
    W_O = torch.randn(n_heads, d_head, d_model, generator=g)
    attn = SimpleNamespace(attn=SimpleNamespace(W_O=W_O))
    model = SimpleNamespace(blocks=[attn, attn], W_U=torch.randn(d_model, vocab, generator=g),
                            ln_final=SimpleNamespace(w=torch.rand(d_model, generator=g) + 0.5),
                            cfg=SimpleNamespace(normalization_type="LN"))
    d_in = n_heads * d_head if hook.endswith("hook_z") else d_model
    sae = SAE.create("topk", d_in=d_in, d_sae=37, k=2, hook_name=hook)

    def formula(d):
        r = d @ W_O.reshape(-1, d_model) if hook.endswith("hook_z") else d
        return ((r - r.mean(-1, keepdim=True)) * model.ln_final.w) @ model.W_U

    d = torch.randn(3, d_in, generator=g)
    want = formula(d)
    got = direct_logits(model, sae, d)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    L = formula(sae.W_dec.detach())  # [d_sae, vocab]
    tol = 1e-5 * L.abs().max()
    for budget in (vocab, 7 * vocab, 1 << 25):  # 1 latent per chunk, 7 (a ragged last chunk), all at once
        top_ids, top, bottom_ids, bottom = logit_effects(model, sae, k=5, budget=budget)
        assert top_ids.shape == (37, 5) and bottom.shape == (37, 5)
        assert (top - L.topk(5, dim=1).values).abs().max() <= tol
        assert (bottom - L.topk(5, dim=1, largest=False).values).abs().max() <= tol
        assert (L.gather(1, top_ids) - top).abs().max() <= tol  # the ids name those values
        assert (L.gather(1, bottom_ids) - bottom).abs().max() <= tol


def test_eval_and_analyze_check_they_can_write_before_the_pass(topk_sae, tmp_path, capsys):
    """A folder where features.h5 / eval.json should go (or a read-only SAE folder) is one line before the pass
    (it was IsADirectoryError after it, leaving a 1.6 MB .tmp, or a PermissionError traceback)."""
    import os

    from saelab.cli import main

    sae = tmp_path / "sae"
    shutil.copytree(topk_sae, sae)
    for f in ("features.h5", "eval.json"):
        (sae / f).unlink(missing_ok=True)
    for cmd, name in (("analyze", "features.h5"), ("eval", "eval.json")):
        (sae / name).mkdir()
        capsys.readouterr()
        assert main([cmd, "--sae", str(sae), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{sae / name} is a folder where this writes a file: move it away" in err, err
        assert sorted(p.name for p in sae.iterdir() if p.name.startswith(".")) == []  # no temp file left
        (sae / name).rmdir()
    if os.geteuid() != 0:  # root writes anywhere
        sae.chmod(0o500)
        try:
            assert main(["eval", "--sae", str(sae), "--quiet"]) == 2
            assert "eval.json cannot be written" in capsys.readouterr().err
        finally:
            sae.chmod(0o700)


def test_the_package_keeps_its_public_names():
    """``from saelab.analysis.features import …`` (and ``from saelab import FeatureDB``) reach the names in their
    homes: the reader, the pass, labels, the file names, the logit lens and decoder geometry."""
    import saelab
    from saelab.analysis import features, geometry, logit_lens
    from saelab.analysis.features import build, codes, db, labels
    from saelab.layout import LABELS_FILE

    assert saelab.FeatureDB is features.FeatureDB is db.FeatureDB
    assert (features.analyze, features.analyze_all, features.BATCH_ROWS) == (build.analyze, build.analyze_all,
                                                                           build.BATCH_ROWS)
    assert (features.load_labels, features.save_label) == (labels.load_labels, labels.save_label)
    assert (features.FEATURES_FILE, features.LABELS_FILE, features.PER_LATENT) == (FEATURES_FILE, LABELS_FILE,
                                                                                  PER_LATENT)
    assert features.sparse_codes is codes.sparse_codes
    for name in ("direct_logits", "logit_effects", "N_LOGITS"):
        assert getattr(features, name) is getattr(logit_lens, name)
    for name in ("best_matches", "decoder_matches", "either_signed", "neighbours", "head_shares"):
        assert getattr(features, name) is getattr(geometry, name)


def test_a_store_holding_nan_writes_no_features_file(tmp_path, capsys):
    """analyze over a store with a NaN row: one line naming the store, and no features.h5 (whose readers take
    every number as finite); the previous features.h5 stays."""
    import h5py

    from saelab.cli import main
    from saelab.fs import sha256_file
    from saelab.store import read_manifest
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "syn"), d=16, n_true=32, rows=4096), progress=False)
    from saelab.sae import SAE

    sae = SAE.create("topk", d_in=16, d_sae=32, k=4, hook_name="synthetic").save(tmp_path / "sae")
    assert main(["analyze", "--sae", str(sae), "--activations", str(store), "--quiet"]) == 0
    before = (sae / "features.h5").read_bytes()
    m = read_manifest(store)
    first = m["shards"][0]
    with h5py.File(store / first["file"], "r+") as f:
        f["activations"][5, 3] = float("nan")
    first["sha256"] = sha256_file(store / first["file"])
    (store / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["analyze", "--sae", str(sae), "--activations", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rows hold NaN or inf values" in err and str(store) in err and len(err.splitlines()) == 1, err
    assert (sae / "features.h5").read_bytes() == before
    assert sorted(p.name for p in sae.iterdir()) == ["cfg.json", "features.h5", "sae_weights.safetensors"]
