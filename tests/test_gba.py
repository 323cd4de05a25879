"""Group bias adaptation (``saelab train --arch relu --bias-adaptation``): the groups' target frequencies, the
sparse step against the dense reference, the bias rule against a plain restatement of it, the CLI run holding L0 at
k, and the one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from saelab.sae import SAE
from saelab.sae.relu import gba_targets

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
D, N, B = 24, 192, 257


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "saelab", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=600)


@pytest.mark.parametrize("groups,span", [(1, 100.0), (4, 10.0), (10, 100.0), (7, 1.0)])
def test_the_targets_sum_to_k_by_contiguous_groups_spaced_over_the_span(groups, span):
    t = gba_targets(1000, 12, groups, span)
    assert t.shape == (1000,) and float(t.sum()) == pytest.approx(12, rel=1e-5)
    g = torch.arange(1000) * groups // 1000
    firsts = torch.stack([t[g == i][0] for i in range(groups)])
    for i in range(groups):  # one target per group
        assert torch.all(t[g == i] == firsts[i])
    assert float(firsts[0] / firsts[-1]) == pytest.approx(span if groups > 1 else 1.0, rel=1e-5)
    assert torch.all(firsts[:-1] >= firsts[1:])


def _gba(seed, every=8):
    torch.manual_seed(seed)
    sae = SAE.create("relu", d_in=D, d_sae=N, k=8, bias_adaptation=True, gba_every=every, gba_rate=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.3 - 3.2)
    sae.total_steps = 20
    return sae


@pytest.mark.parametrize("seed", [0, 1])
def test_the_sparse_step_matches_the_dense_reference_and_the_bias_takes_no_gradient(seed):
    import copy

    sae = _gba(seed)
    x = torch.randn(B, D) * 1.5
    runs = {}
    for kernel in ("reference", "auto"):
        s = copy.deepcopy(sae)
        s.kernel = kernel
        out = s.loss(x, step=7)
        out["loss"].backward()
        s.after_step(out, 7)  # step 7 of gba_every 8: the rule runs
        runs[kernel] = (s, out)
    (ref, o_ref), (got, o_got) = runs["reference"], runs["auto"]
    assert "f" in o_ref and "sparse" in o_got and set(o_got) - {"sparse"} == set(o_ref) - {"f"}
    assert "l1" not in o_got  # the reconstruction alone
    torch.testing.assert_close(o_got["loss"], o_ref["loss"], rtol=1e-5, atol=1e-5)
    assert ref.b_enc.grad is None and got.b_enc.grad is None
    for name in ("W_enc", "W_dec", "b_dec"):
        a, b = getattr(ref, name).grad, getattr(got, name).grad
        scale = float(a.abs().max())
        torch.testing.assert_close(b / scale, a / scale, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got.b_enc, ref.b_enc, rtol=1e-6, atol=1e-6)


def test_the_rule_moves_each_bias_by_its_clipped_relative_frequency_error():
    sae = _gba(3, every=2)
    x1, x2 = torch.randn(B, D) * 1.5, torch.randn(B, D) * 1.5
    b0 = sae.b_enc.detach().clone()
    fires = torch.zeros(N)
    with torch.no_grad():
        for step, x in enumerate((x1, x2)):
            out = sae.loss(x, step=step)
            fires += (sae.dense_codes(out) != 0).sum(0)
            if step == 0:
                sae.after_step(out, step)
                assert torch.equal(sae.b_enc, b0)  # the rule waits for gba_every steps
            else:
                w = sae.W_enc.norm(dim=0)
                sae.after_step(out, step)
    err = ((fires.double() / (2 * B) - sae.gba_target) / sae.gba_target).clamp(-1, 1)
    torch.testing.assert_close(sae.b_enc, b0 - (0.1 * err).float() * w, rtol=1e-6, atol=1e-6)
    assert int(sae.gba_tokens) == 0 and int(sae.gba_fires.sum()) == 0  # the counts start again


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("gba") / "planted"
    return write_synthetic(SyntheticConfig(out=str(out), d=16, n_true=48, active=3, rows=16384, shard_rows=4096,
                                           holdout=0.125), progress=False)


def test_a_gba_run_from_the_cli_holds_l0_near_k_and_saves_a_plain_relu_sae(planted, tmp_path):
    out = tmp_path / "gba"
    r = _cli("train", "--activations", planted, "--out", out, "--arch", "relu", "--bias-adaptation", "--k", 3,
             "--width", 64, "--batch-size", 256, "--tokens", 256 * 200, "--lr", "3e-3", "--quiet")
    assert r.returncode == 0, r.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert 2.0 < ev["l0"] < 4.5, ev["l0"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "l1" not in recs[-1] and "sparsity_coeff" not in recs[-1]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["saelab"]["bias_adaptation"] is True
    sae = SAE.load(out)
    norms = sae.W_dec.detach().norm(dim=1)  # unit rows in the trainer's units: one norm once the scale is folded in
    torch.testing.assert_close(norms, torch.full((64,), float(norms[0])))


def test_at_rate_0_the_biases_stay_where_the_sample_quantiles_put_them(planted, tmp_path):
    out = tmp_path / "still"
    r = _cli("train", "--activations", planted, "--out", out, "--arch", "relu", "--bias-adaptation", "--k", 3,
             "--width", 64, "--batch-size", 256, "--tokens", 256 * 20, "--gba-rate", 0, "--quiet")
    assert r.returncode == 0, r.stderr
    # no gradient and no rule moved the biases: every latent's cut sits at its target quantile of the init sample's
    # pre-activations, so the held-out L0 is about k already
    assert json.loads((out / "train.json").read_text())["done"]
    ev = json.loads((out / "eval.json").read_text())
    assert 1.5 < ev["l0"] < 6, ev["l0"]


@pytest.mark.parametrize("extra,needle", [
    (["--arch", "topk", "--bias-adaptation"], "--bias-adaptation applies to --arch relu only, and this run trains "
                                              "topk: drop it, or pass --arch relu"),
    (["--arch", "relu", "--gba-rate", "0.3"], "--gba-rate applies with --bias-adaptation only"),
    (["--arch", "relu", "--bias-adaptation", "--l1-coeff", "1"], "--bias-adaptation and --l1-coeff both set the "
                                                                 "sparsity"),
    (["--arch", "relu", "--bias-adaptation", "--gba-groups", "100"], "--gba-groups 100 is more than the 64 latents"),
    (["--arch", "relu", "--bias-adaptation", "--gba-span", "0.5"], "--gba-span 0.5: pass a finite number at least"),
])
def test_bad_gba_settings_are_one_line_and_write_nothing(extra, needle, planted, tmp_path):
    r = _cli("train", "--activations", planted, "--out", tmp_path / "o", "--k", 3, "--width", 64, "--tokens", 4096,
             "--quiet", *extra)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
