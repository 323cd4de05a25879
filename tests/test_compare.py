"""saelab compare: latents of two SAEs matched by decoder cosine (saelab.analysis.compare)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae.base import SAE


def _brute(A, B, k, signed):
    """The full cosine matrix and its top-k: the reference of geometry.best_matches."""
    S = (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T
    if signed:
        S = S.abs()
    v, i = S.topk(k, dim=1)
    return i, v


@pytest.mark.parametrize("signed", [False, True])
def test_best_matches_equal_the_full_cosine_matrix(signed):
    """geometry.best_matches against the explicit [len(A), len(B)] cosines, with one row per chunk, ragged
    chunks, and all rows at once; rows of unequal norms."""
    from saelab.analysis.geometry import best_matches

    g = torch.Generator().manual_seed(1)
    A = torch.randn(37, 16, generator=g) * torch.rand(37, 1, generator=g)
    B = torch.randn(53, 16, generator=g) * torch.rand(53, 1, generator=g)
    want_ids, want_cos = _brute(A, B, 3, signed)
    for budget in (53, 5 * 53, 1 << 25):
        ids, cos = best_matches(A, B, 3, budget, signed=signed)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(cos, want_cos, rtol=1e-5, atol=1e-6)


def _pair(arch, n_kept=56, d_sae=64, d_in=16, negate=0):
    """SAE a (random) and SAE b: a's decoder rows permuted and rescaled, the first ``negate`` kept rows negated,
    and d_sae - n_kept rows replaced by fresh random directions. Returns (a, b, perm): b's row j is a's row perm[j]
    for j < n_kept."""
    g = torch.Generator().manual_seed(0)
    a = SAE.create(arch, d_in=d_in, d_sae=d_sae, k=4)
    perm = torch.randperm(d_sae, generator=g)
    W = a.W_dec.detach()[perm] * (0.5 + torch.rand(d_sae, 1, generator=g))
    W[:negate] *= -1
    W[n_kept:] = torch.randn(d_sae - n_kept, d_in, generator=g)
    w = {"W_enc": W.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W, "b_dec": torch.zeros(d_in)}
    return a, SAE.from_weights(a.cfg, w), perm


def test_compare_finds_a_permuted_copy():
    """b holds 56 of a's 64 directions (permuted, rescaled) and 8 random ones: every kept latent is matched to its
    origin at cosine 1 both ways and mutually; the 8 random ones are not at ≥ 0.9; the alive-only numbers are
    over the masked latents."""
    from saelab.analysis.compare import compare_saes

    a, b, perm = _pair("topk")
    res = compare_saes(a, b)
    assert compare_saes(a, b, device="cpu") == res  # an explicit device: the same numbers
    kept = perm[:56].numpy()
    m = res["matches"]
    assert np.array_equal(np.asarray(m["b_to_a"]["ids"])[:56], kept)
    assert np.array_equal(np.asarray(m["a_to_b"]["ids"])[kept], np.arange(56))
    np.testing.assert_allclose(np.asarray(m["a_to_b"]["cos"])[kept], 1.0, atol=1e-5)
    assert res["b_to_a"]["frac_0.9"] == pytest.approx(56 / 64) and res["a_to_b"]["frac_0.9"] == pytest.approx(56 / 64)
    assert res["mutual_0.9"] == 56 and res["mutual"] >= 56 and not res["signed"]
    assert res["a_to_b"]["mmcs"] == pytest.approx(np.mean(m["a_to_b"]["cos"]))
    # alive masks: only b's kept rows "fired" → every alive latent of b is matched at cosine 1
    alive_b = np.arange(64) < 56
    res = compare_saes(a, b, alive_b=alive_b)
    assert res["b_to_a"]["alive"] == 56 and res["b_to_a"]["mmcs_alive"] == pytest.approx(1.0, abs=1e-5)
    assert res["b_to_a"]["frac_0.9_alive"] == 1.0 and "alive" not in res["a_to_b"]
    with pytest.raises(SaelabError, match="alive_a has 3 entries for an SAE of 64 latents"):
        compare_saes(a, b, alive_a=np.ones(3, bool))


def test_signed_saes_match_a_direction_of_either_sign():
    """A negated direction is the same latent for a signed (AbsTopK) SAE, |cosine| 1; for an unsigned one it is
    cosine -1, not a match."""
    from saelab.analysis.compare import compare_saes

    for arch, want in (("abstopk", 56), ("topk", 46)):
        a, b, _ = _pair(arch, negate=10)
        res = compare_saes(a, b)
        assert res["signed"] == (arch == "abstopk") and res["mutual_0.9"] == want, (arch, res["mutual_0.9"])


def test_chance_is_what_unrelated_random_dictionaries_get():
    """Two SAEs of independent random init (isotropic unit directions) have the MMCS chance_mmcs predicts, within
    0.01; the floor rises with the other's count, falls with d_in, and is higher for absolute cosines; two SAEs
    of the same init match index to index, and same_index counts it."""
    from saelab.analysis.compare import chance_mmcs, compare_saes

    torch.manual_seed(5)
    a = SAE.create("topk", d_in=32, d_sae=512, k=4)
    b = SAE.create("topk", d_in=32, d_sae=256, k=4)
    res = compare_saes(a, b)
    assert res["a_to_b"]["mmcs"] == pytest.approx(res["chance_mmcs"]["a_to_b"], abs=0.01)
    assert res["b_to_a"]["mmcs"] == pytest.approx(res["chance_mmcs"]["b_to_a"], abs=0.01)
    assert res["chance_mmcs"]["a_to_b"] == pytest.approx(chance_mmcs(32, 256), abs=1e-6)
    assert chance_mmcs(32, 256) < chance_mmcs(32, 512) and chance_mmcs(64, 256) < chance_mmcs(32, 256)
    assert chance_mmcs(32, 256) < chance_mmcs(32, 256, signed=True)
    assert res["same_index"] <= 3
    torch.manual_seed(5)
    twin = SAE.create("topk", d_in=32, d_sae=512, k=4)
    assert compare_saes(a, twin)["same_index"] == 512


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "saelab", "compare", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_compares_two_layers_of_the_demo_group(demo_group, tmp_path):
    """A subprocess prints and writes what compare_saes gives for the two SAEs (alive counts from their
    features.h5); an SAE against itself has MMCS 1 and every latent its own mutual match."""
    from saelab.analysis.compare import compare_saes
    from saelab.analysis.features.db import FeatureDB

    h0, h1 = sorted(demo_group.saes)
    out = tmp_path / "c.json"
    r = _cli("--sae", demo_group.group, "--hook", h0, "--other", demo_group.saes[h1], "--json", out)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    a, b = SAE.load(demo_group.saes[h0]), SAE.load(demo_group.saes[h1])
    with FeatureDB(demo_group.saes[h0]) as da, FeatureDB(demo_group.saes[h1]) as db:
        want = compare_saes(a, b, alive_a=da.density > 0, alive_b=db.density > 0)
    assert got["matches"] == want["matches"] and got["mutual"] == want["mutual"]
    # the mutual matches against the full cosine matrix: pairs that are each other's argmax (not all: 2,048 latents)
    Wa, Wb = a.W_dec.detach(), b.W_dec.detach()
    ia, ib = _brute(Wa, Wb, 1, False)[0][:, 0], _brute(Wb, Wa, 1, False)[0][:, 0]
    mutual = int((ib[ia] == torch.arange(a.d_sae)).sum())
    assert want["mutual"] == mutual < a.d_sae
    for side in ("a_to_b", "b_to_a"):
        assert got[side] == pytest.approx(want[side])
        assert f"{want[side]['mmcs']:.3f}" in r.stdout and f"{want[side]['alive']:,}" in r.stdout
    assert f"mutual matches: {want['mutual']:,} pairs" in r.stdout and "different hooks" in r.stdout
    # the demo trains every hook from seed 0: most latents' best match has their own index, and the output says so
    assert want["same_index"] == int((ia == torch.arange(a.d_sae)).sum()) > 0.05 * a.d_sae
    assert f"note: {want['same_index']:,} of A's" in r.stdout and "the same --seed" in r.stdout
    assert f"MMCS {want['chance_mmcs']['a_to_b']:.3f} A → B" in r.stdout
    assert (got["a"]["hook"], got["b"]["hook"]) == (h0, h1)
    same = compare_saes(a, a)
    assert same["a_to_b"]["mmcs"] == pytest.approx(1.0, abs=1e-5) and same["mutual"] == a.d_sae
    assert same["matches"]["a_to_b"]["ids"] == list(range(a.d_sae))


def _group(root, saes: dict):
    """A group folder of {hook: SAE folder to copy, or an SAE to save}."""
    import shutil

    root.mkdir(parents=True)
    for hook, sae in saes.items():
        if isinstance(sae, SAE):
            sae.save(root / hook)
        else:
            shutil.copytree(sae, root / hook)
    (root / "group.json").write_text(json.dumps({"model": "tiny", "hooks": {h: h for h in saes}}))
    return root


def test_two_groups_are_compared_hook_by_hook(demo_group, tmp_path, capsys):
    """Two group folders and no hook flags: one comparison per hook both hold (a copy of the demo group matches
    itself at MMCS 1), the others named as not compared; groups that share no hook are a one-line error."""
    from saelab.cli import main
    from saelab.cli.compare import run_compare

    h0, h1 = sorted(demo_group.saes)
    copy = _group(tmp_path / "copy", dict(demo_group.saes))
    res, lines = run_compare(demo_group.group, copy)
    assert list(res["pairs"]) == [h0, h1] and lines[0] == f"== {h0}" and f"== {h1}" in lines
    for h in (h0, h1):
        pair = res["pairs"][h]
        assert (pair["a"]["hook"], pair["b"]["hook"]) == (h, h) and pair["mutual"] == pair["a"]["d_sae"]
        assert pair["a_to_b"]["mmcs"] == pytest.approx(1.0, abs=1e-5)
    other = SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name="blocks.2.hook_resid_post", model_name="tiny")
    half = _group(tmp_path / "half", {h1: demo_group.saes[h1], "blocks.2.hook_resid_post": other})
    res, lines = run_compare(demo_group.group, half)
    assert list(res["pairs"]) == [h1]
    assert lines[-1] == f"(not in both groups, not compared: {h0}, blocks.2.hook_resid_post)"
    other3 = SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name="blocks.3.hook_resid_post", model_name="tiny")
    apart = _group(tmp_path / "apart", {"blocks.2.hook_resid_post": other, "blocks.3.hook_resid_post": other3})
    capsys.readouterr()
    assert main(["compare", "--sae", str(demo_group.group), "--other", str(apart)]) == 2
    err = capsys.readouterr().err.strip()
    assert "share no hook: pass --hook and --other-hook" in err and len(err.splitlines()) == 1, err


def test_cli_errors_are_one_line(demo_group, tmp_path, capsys):
    from saelab.cli import main

    h0 = sorted(demo_group.saes)[0]
    narrow = tmp_path / "narrow"  # an SAE of another width of activations
    SAE.create("topk", d_in=16, d_sae=32, k=4, hook_name=h0, model_name="tiny").save(narrow)
    other_model = tmp_path / "other"
    s = SAE.load(demo_group.saes[h0])
    s.cfg.model_name = "gpt2"
    s.save(other_model)
    sae = str(demo_group.saes[h0])
    cases = [
        (["--sae", sae, "--other", str(narrow)], "the decoders write different spaces (width 128 and 16)"),
        (["--sae", sae, "--other", str(other_model)], "different models (tiny and gpt2)"),
        (["--sae", sae, "--other", str(demo_group.group)], "pass --other-hook, one of"),
        (["--sae", sae, "--other", str(demo_group.group), "--other-hook", "blocks.9.hook_resid_post"],
         "--other-hook blocks.9.hook_resid_post is not in"),
        (["--sae", str(tmp_path / "missing"), "--other", sae], "no such folder"),
        (["--sae", sae, "--other", sae, "--json", str(tmp_path)], "is a folder: pass a file name"),
        (["--sae", sae, "--other", sae, "--device", "gpu"], "unknown device 'gpu'"),
    ]
    for args, msg in cases:
        assert main(["compare", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (args, err)


# ---------------------------------------------------------------------------------------------------- universality
def test_svcca_is_one_under_an_invertible_map_and_low_for_unrelated_matrices():
    """SVCCA (saelab.analysis.universality) of W and W @ M is 1 within 1e-6: a rank-6 W under a general invertible
    M (both sides keep the same 6 directions), a full-rank W under an orthogonal M (its spectrum kept), and under a
    general M with every direction kept; independent random matrices (shifted or not: each side is centred), and
    random pairings of the rows, score well below (about 0.3 here)."""
    from saelab.analysis.universality import random_svcca, svcca

    rng = np.random.default_rng(0)
    M = rng.standard_normal((24, 24))  # invertible (a Gaussian matrix, almost surely)
    low = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 24))
    res = svcca(low, low @ M)
    assert res["score"] == pytest.approx(1.0, abs=1e-6) and res["dims"] == (6, 6), res
    full = rng.standard_normal((400, 24)) * np.linspace(1, 3, 24)
    Q = np.linalg.qr(M)[0]
    assert svcca(full, full @ Q)["score"] == pytest.approx(1.0, abs=1e-6)
    assert svcca(full, full @ M, keep=1.0)["score"] == pytest.approx(1.0, abs=1e-6)
    other = rng.standard_normal((400, 32))
    unrelated = svcca(full, other)["score"]
    assert svcca(full + 10, other - 3)["score"] == pytest.approx(unrelated, abs=1e-10)  # each side centred
    shuffled = random_svcca(full, full @ M, draws=5)
    assert unrelated < 0.5 and shuffled.max() < 0.5, (unrelated, shuffled)
    rng = np.random.default_rng(0)  # the draws are svcca of the permuted rows (one basis per side, rows permuted)
    want = [svcca(full, (full @ M)[rng.permutation(400)])["score"] for _ in range(5)]
    np.testing.assert_allclose(shuffled, want, atol=1e-10)


def test_cca_equals_the_direct_formula_and_scikit_learn():
    """The canonical correlations against the eigenvalues of Sxx⁻¹ Sxy Syy⁻¹ Syx (their square roots, within
    1e-10) and against sklearn.cross_decomposition.CCA's per-component score correlations (NIPALS, within 1e-6)."""
    from sklearn.cross_decomposition import CCA

    from saelab.analysis.universality import cca

    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 3))
    Y = X @ rng.standard_normal((3, 4)) * np.array([1, 0.5, 0.2, 0.1]) + rng.standard_normal((200, 4))
    got = cca(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Sxx, Syy, Sxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    ev = np.linalg.eigvals(np.linalg.solve(Sxx, Sxy) @ np.linalg.solve(Syy, Sxy.T)).real
    np.testing.assert_allclose(got, np.sqrt(np.sort(ev)[::-1]), atol=1e-10)
    xs, ys = CCA(n_components=3, scale=False, max_iter=10000, tol=1e-14).fit(X, Y).transform(X, Y)
    np.testing.assert_allclose(got, [np.corrcoef(xs[:, i], ys[:, i])[0, 1] for i in range(3)], atol=1e-6)
    assert len(cca(X, np.c_[Y, Y[:, :1] * 2])) == 3  # a dependent column adds no canonical direction


def _rotated_copy(a, d_out, perm, seed=1, arch="topk", negate=(), **cfg):
    """(SAE b, R): b reads x @ R (R [d_in, d_out], orthonormal rows: an isometric "other model") and is SAE a with
    its latents permuted (b's latent j is a's latent perm[j]) and its decoder rows mapped by R, so that b's codes of
    x @ R are a's codes of x, permuted; the latents in ``negate`` (b's ids) read and write the opposite sign."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(d_out, a.d_in, generator=g))[0].T  # [d_in, d_out], R Rᵀ = I
    s = torch.ones(a.d_sae)
    s[list(negate)] = -1
    w = {"W_enc": R.T @ a.W_enc.detach()[:, perm] * s, "b_enc": a.b_enc.detach()[perm] * s,
         "W_dec": (a.W_dec.detach()[perm] @ R) * s[:, None], "b_dec": a.b_dec.detach() @ R}
    return SAE.from_weights(SAE.create(arch, d_in=d_out, d_sae=a.d_sae, k=a.cfg.k, **cfg).cfg, w), R


def _random_sae(arch="topk", d_in=16, d_sae=64, dead=(), seed=2, **cfg):
    """A random SAE with small random biases; the latents in ``dead`` never fire (a very negative bias)."""
    torch.manual_seed(seed)
    a = SAE.create(arch, d_in=d_in, d_sae=d_sae, k=4, **cfg)
    with torch.no_grad():
        a.b_enc.normal_(0, 0.1)
        a.b_enc[list(dead)] = -1e4
        a.b_dec.normal_(0, 0.1)
    return a


def test_pairing_finds_a_permuted_rotated_copy():
    """B is A permuted and rotated into another width (24 dims for A's 16): each live latent of A is paired with its
    permuted partner at correlation 1 (within 1e-5; float32 codes), one to one; the 5 latents that never fire are
    left out; SVCCA of the pairs is 1 and the random pairings lower, p = 1 / 21; the correlation sums in chunks of
    22 latents of A (3 passes) give the same pairs, and equal numpy's Pearson correlations of the whole codes
    against an unrelated SAE. Signed (AbsTopK) with 10 of B's latents negated: paired by
    |ρ| and the negated decoder rows turned back, SVCCA 1 again."""
    from saelab.analysis.universality import universality

    dead = [3, 17, 40, 41, 63]
    a = _random_sae(dead=dead)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    b, R = _rotated_copy(a, 24, perm)
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(5))
    batches = lambda: [(x[i:i + 1000], x[i:i + 1000] @ R) for i in range(0, len(x), 1000)]  # noqa: E731
    res = universality(a, b, batches)
    partner = torch.argsort(perm).numpy()  # a's latent i is b's latent partner[i]
    live = np.setdiff1d(np.arange(64), dead)
    m = res["matches"]
    assert m["a"] == live.tolist() and m["b"] == partner[live].tolist()
    np.testing.assert_allclose(m["corr"], 1.0, atol=1e-5)
    assert res["pairs"] == 59 and res["alive"] == {"a": 59, "b": 59} and res["rows"] == 4000
    assert res["mean_pair_corr"] == pytest.approx(1.0, abs=1e-5) and res["svcca"] == pytest.approx(1.0, abs=1e-6)
    assert res["random_svcca_mean"] < 0.7 and res["p_value"] == pytest.approx(1 / 21) and not res["signed"]
    assert set(res) >= {"pairs", "mean_pair_corr", "svcca", "random_svcca_mean", "random_svcca_std", "p_value",
                        "rows", "variance_kept"}
    chunked = universality(a, b, batches, budget=8 * 64 * 22)["matches"]  # float32 products: equal within 1e-6
    assert (chunked["a"], chunked["b"]) == (m["a"], m["b"])
    np.testing.assert_allclose(chunked["corr"], m["corr"], atol=1e-6)

    # against the full [rows, d_sae] codes: Pearson correlations (numpy) of A and an unrelated SAE of 48 latents
    from saelab.analysis.universality import correlate

    c = _random_sae(d_in=24, d_sae=48, seed=9)  # reads x @ R, as b
    got = correlate(a, c, batches, budget=8 * 48 * 32)  # 2 passes
    with torch.no_grad():
        fa, fc = a.encode(x).double().numpy(), c.encode(x @ R).double().numpy()
    live_c = fc.std(0) > 0
    with np.errstate(invalid="ignore", divide="ignore"):  # the dead latents' rows: NaN
        full = np.corrcoef(fa.T, fc.T)[:64, 64:]
    full[:, ~live_c] = -np.inf
    assert np.array_equal(got["alive_b"], live_c) and np.array_equal(got["alive_a"], fa.std(0) > 0)
    assert np.array_equal(got["best"][live], full[live].argmax(1)) and (got["best"][dead] == -1).all()
    np.testing.assert_allclose(got["corr"][live], full[live].max(1), atol=1e-5)

    a = _random_sae("abstopk")
    b, R = _rotated_copy(a, 24, perm, arch="abstopk", negate=range(10))
    res = universality(a, b, lambda: [(x, x @ R)])
    assert res["signed"] and res["pairs"] == 64 and res["matches"]["b"] == partner.tolist()
    assert res["svcca"] == pytest.approx(1.0, abs=1e-6) and res["mean_pair_corr"] == pytest.approx(1.0, abs=1e-5)


def test_the_p_value_counts_the_random_pairings_at_or_above():
    from saelab.analysis.universality import p_value

    assert p_value(0.5, [0.4, 0.5, 0.6]) == pytest.approx(3 / 4) and p_value(0.9, [0.1] * 20) == pytest.approx(1 / 21)


def test_many_to_one_pairs_keep_the_best_correlated():
    """Lan et al.'s one-to-one rule: of A's latents that pick the same latent of B only the one of highest
    correlation keeps it (a tie: the lower id); latents without a match (-1) are left out."""
    from saelab.analysis.universality import one_to_one

    a, b = one_to_one(np.array([2, 2, 0, -1, 0, 5]), np.array([0.5, 0.9, 0.7, np.nan, 0.7, 0.1]))
    assert a.tolist() == [1, 2, 5] and b.tolist() == [2, 0, 5]


def _write_store(folder, acts, tokens, hook, model, holdout=0, bos=False):
    """A complete store of ``acts`` [rows, d_in] and ``tokens`` [contexts, ctx] (BOS first with ``bos``), its last
    ``holdout`` contexts held out."""
    from saelab.store import ShardWriter, new_manifest

    ctx = tokens.shape[1]
    w = ShardWriter(folder, new_manifest(model=model, hook=hook, d_in=acts.shape[1], dtype="float32",
                                         context_size=ctx, bos_included=bos, seed=0,
                                         dataset={"name": "test", "split": "train", "text_column": "text"},
                                         has_grads=False, head_layout=None, n_contexts_planned=len(tokens),
                                         tokenizer_bos=None, model_info=None))
    cut = len(tokens) - holdout
    w.write_shard(np.ascontiguousarray(acts[:cut * ctx], np.float32), tokens[:cut])
    if holdout:
        w.write_shard(np.ascontiguousarray(acts[cut * ctx:], np.float32), tokens[cut:], holdout=True)
    w.finish()
    return folder


def test_universality_across_two_models_of_other_widths(tmp_path, capsys):
    """saelab compare --universality on SAEs of two models (widths 16 and 24; B the rotated, permuted copy of A)
    and their row-aligned stores: no decoder cosines (the output says why), the pairs found at correlation 1 over
    the held-out rows, SVCCA 1 in the printout and the JSON; the same stores with other tokens in one context are
    a one-line error naming how to harvest them."""
    from saelab.analysis.universality import plan_rows
    from saelab.cli import main
    from saelab.store import ActivationStore

    a = _random_sae(hook_name="blocks.0.hook_resid_post", model_name="m1")
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    b, R = _rotated_copy(a, 24, perm, hook_name="blocks.0.hook_resid_post", model_name="m2")
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    x = torch.randn(64 * 32, 16, generator=torch.Generator().manual_seed(5))
    tokens = np.arange(64 * 32, dtype=np.int32).reshape(64, 32) % 1000
    sa = _write_store(tmp_path / "m1" / "blocks.0.hook_resid_post", x.numpy(), tokens, "blocks.0.hook_resid_post",
                      "m1", holdout=40)
    sb = _write_store(tmp_path / "m2" / "blocks.0.hook_resid_post", (x @ R).numpy(), tokens,
                      "blocks.0.hook_resid_post", "m2", holdout=40)
    out = tmp_path / "u.json"
    args = ["compare", "--sae", str(tmp_path / "a"), "--other", str(tmp_path / "b"), "--universality",
            "--activations", str(tmp_path / "m1"), "--other-activations", str(sb), "--rows", "1000", "--quiet"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    u = json.loads(out.read_text())["universality"]
    assert u["rows"] == 1000 and u["split"] == "holdout" and u["pairs"] == 64
    assert u["matches"]["b"] == torch.argsort(perm).tolist() and u["svcca"] == pytest.approx(1.0, abs=1e-6)
    assert "decoder cosines are not compared" in printed and "MMCS" not in printed
    assert f"SVCCA of the paired decoder rows: {u['svcca']:.3f}" in printed and "over 1,000 rows" in printed
    assert "a_to_b" not in json.loads(out.read_text())
    plan = plan_rows(ActivationStore(sa), ActivationStore(sb), 10 ** 6)
    assert plan == {"split": "holdout", "rows": 40 * 32, "skip_bos": False}
    other = tokens.copy()
    other[30, 5] += 1  # held-out context 6, among the 32 that 1,000 rows read
    sc = _write_store(tmp_path / "m3" / "blocks.0.hook_resid_post", (x @ R).numpy(), other,
                      "blocks.0.hook_resid_post", "m2", holdout=40)
    args[args.index(str(sb))] = str(sc)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not row-aligned (context 6 of the holdout split holds other tokens)" in err, err
    assert "harvest both models on the same --dataset" in err and len(err.splitlines()) == 1


def test_cli_universality_of_two_layers_of_the_demo_group(demo_group, tmp_path, capsys):
    """saelab compare --universality on the demo's two layers (one harvest run: B's store found beside A's): the
    decoder comparison as without it, then SVCCA in [0, 1] and above the random pairings' mean, the JSON holding
    every key, the rows the held-out split's first, BOS positions left out."""
    from saelab.cli import main

    h0, h1 = sorted(demo_group.saes)
    out = tmp_path / "u.json"
    assert main(["compare", "--sae", str(demo_group.group), "--hook", h0, "--other", str(demo_group.saes[h1]),
                 "--universality", "--activations", str(demo_group.run), "--rows", "8192", "--quiet",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    u = got["universality"]
    assert set(u) >= {"pairs", "mean_pair_corr", "svcca", "random_svcca_mean", "random_svcca_std", "p_value", "rows",
                      "variance_kept", "split", "matches"}
    assert u["rows"] == 8192 and u["split"] == "holdout" and 0 < u["pairs"] <= u["alive"]["a"] <= 2048
    assert 0 <= u["random_svcca_mean"] < u["svcca"] <= 1 and 0 < u["p_value"] <= 1
    assert len(set(u["matches"]["b"])) == u["pairs"] and 0 < u["mean_pair_corr"] <= 1
    assert "a_to_b" in got and "mutual matches:" in printed  # the decoder comparison, as without --universality
    assert f"{u['random_svcca_mean']:.3f} ± {u['random_svcca_std']:.3f} over 20 draws" in printed
    print(f"demo universality: SVCCA {u['svcca']:.4f}, random {u['random_svcca_mean']:.4f} ± "
          f"{u['random_svcca_std']:.4f}, {u['pairs']} pairs, mean corr {u['mean_pair_corr']:.4f}", file=sys.stderr)


def test_universality_errors_are_one_line(demo_group, tmp_path, capsys):
    """A missing --activations, its flags without --universality, a store of another row count, a store of another
    width, a RUN folder without B's store, and two groups without hook flags: one line each."""
    from saelab.cli import main
    from saelab.store import ActivationStore

    h0, h1 = sorted(demo_group.saes)
    sa, sb = str(demo_group.saes[h0]), str(demo_group.saes[h1])
    short = _write_store(tmp_path / "short" / h1, np.zeros((256, 128), np.float32), np.zeros((2, 128), np.int32), h1,
                         "tiny", bos=True)
    narrow = _write_store(tmp_path / "narrow" / h0, np.zeros((256, 16), np.float32), np.zeros((2, 128), np.int32), h0,
                          "tiny")
    run = str(demo_group.run)
    lone = tmp_path / "lone"  # a RUN folder holding A's store only
    lone.mkdir()
    (lone / h0).symlink_to(demo_group.stores[h0], target_is_directory=True)
    rows = ActivationStore(demo_group.stores[h0], verify=False).n_rows("all")
    cases = [
        (["--sae", sa, "--other", sb, "--universality"], "--universality encodes the same tokens with both SAEs: "
                                                         "pass --activations STORE_OR_RUN"),
        (["--sae", sa, "--other", sb, "--activations", run], "--activations applies to --universality only"),
        (["--sae", sa, "--other", sb, "--rows", "10"], "--rows applies to --universality only"),
        (["--sae", sa, "--other", sb, "--universality", "--activations", run, "--other-activations", str(short)],
         f"are not row-aligned (n_tokens {rows} vs 256): harvest both models on the same --dataset"),
        (["--sae", sa, "--other", sb, "--universality", "--activations", str(narrow)],
         "(d_in 16) but the SAE reads"),
        (["--sae", sa, "--other", sb, "--universality", "--activations", str(lone)],
         f"holds no store of {h1}, the hook SAE B reads: pass --other-activations"),
        (["--sae", str(demo_group.group), "--other", str(demo_group.group), "--universality", "--activations", run],
         "--universality compares one SAE of each side: pass --hook and --other-hook"),
    ]
    for args, msg in cases:
        assert main(["compare", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (args, err)
