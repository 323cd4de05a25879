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
