"""End-to-end training (``saelab train --objective kl | kl+ds``): the later layers a kl+ds run reconstructs, the
context batches and their resume state, the spliced KL against a plain restatement, CLI runs whose KL falls, and the
one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from saelab.e2e import ContextBatches, Splice, downstream_hooks
from saelab.evaluate import kl_per_position

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "saelab", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=900)


@pytest.mark.parametrize("hook,want", [
    ("blocks.0.hook_resid_post", ["blocks.1.hook_resid_post"]),
    ("blocks.1.hook_mlp_out", ["blocks.1.hook_resid_post"]),
    ("blocks.0.attn.hook_z", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]),
    ("hook_embed", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]),
    ("blocks.1.hook_resid_post", []),
])
def test_the_later_residual_streams_of_a_hook(hook, want):
    assert downstream_hooks(hook, 2) == want


def test_context_batches_cover_each_epoch_once_reshuffle_and_resume_where_they_stopped():
    tokens = np.arange(40 * 3).reshape(40, 3)
    it = ContextBatches(tokens, 8, 12, seed=5, device="cpu")
    served = [b for b in it]
    assert len(served) == 12 and all(b.shape == (8, 3) and b.dtype == torch.long for b in served)
    first = torch.cat(served[:5])[:, 0].sort().values
    assert torch.equal(first, torch.arange(0, 120, 3))  # epoch 0: every context once
    assert not torch.equal(torch.cat(served[:5]), torch.cat(served[5:10]))  # epoch 1: another order
    assert it.epochs == pytest.approx(12 * 8 / 40)
    again = ContextBatches(tokens, 8, 12, seed=5, device="cpu")
    state = json.loads(json.dumps({**ContextBatches(tokens, 8, 12, 5, "cpu").state_dict(), "served": 7}))
    again.load_state_dict(state)  # as a checkpoint stores it: JSON
    rest = list(again)
    assert len(rest) == 5 and all(torch.equal(a, b) for a, b in zip(rest, served[7:]))


@pytest.mark.parametrize("objective", ["kl", "kl+ds"])
def test_the_spliced_kl_matches_a_plain_restatement_and_the_model_takes_no_gradient(tiny, objective):
    torch.manual_seed(0)
    model = tiny
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # frozen, as the trainer freezes it (restored: the model is the session's)
        p.requires_grad_(False)
    try:
        _check_splice(model, objective)
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)


def _check_splice(model, objective):
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 12))
    hook = "blocks.0.hook_resid_post"
    sp = Splice(model, hook, objective, first=1, kl_coeff=1.0, ds_coeff=1.0)
    x, kept = sp.clean(tokens)
    assert x.shape == (3 * 11, model.cfg.d_model)
    same = sp.loss(x, kept)  # the clean rows spliced back: nothing changes
    assert float(same["kl"]) < 1e-6 and ("ds" not in same or float(same["ds"]) < 1e-6)
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    terms = sp.loss(x_hat, kept)

    def put(act, hook):
        new = act.clone()
        new[:, 1:] = x_hat.detach().reshape(3, 11, -1)
        return new

    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, put)])
    want = kl_per_position(clean[:, 1:], spliced[:, 1:]).mean()
    torch.testing.assert_close(terms["kl"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kl_term"], model.cfg.d_model * want, rtol=1e-5, atol=1e-5)
    if objective == "kl+ds":  # the later layer's residual stream, clean and spliced
        later = "blocks.1.hook_resid_post"
        seen = {}

        def grab(name):
            def fn(act, hook):
                seen[name] = act.detach()
            return fn

        model.run_with_hooks(tokens, fwd_hooks=[(later, grab("clean"))])
        model.run_with_hooks(tokens, fwd_hooks=[(hook, put), (later, grab("spliced"))])
        a, b = seen["clean"][:, 1:], seen["spliced"][:, 1:]
        want_ds = (a - b).pow(2).sum(-1).mean() / a.pow(2).sum(-1).mean()
        torch.testing.assert_close(terms["ds"], want_ds, rtol=1e-5, atol=1e-7)
        assert float(terms["ds"].detach()) > 0
    terms["kl_term"].backward()
    assert x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def store(small_run):
    return small_run[1]["blocks.0.hook_resid_post"]


@pytest.mark.parametrize("objective", ["kl", "kl+ds"])
def test_an_e2e_run_from_the_cli_lowers_its_kl_and_saves_an_sae(objective, store, tmp_path):
    out = tmp_path / "e2e"
    r = _cli("train", "--activations", store, "--out", out, "--arch", "topk", "--k", 8, "--expansion", 2,
             "--objective", objective, "--batch-size", 512, "--tokens", 512 * 40, "--lr", "3e-3", "--log-every", 5,
             "--quiet")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 40 and recs[-1]["kl"] < 0.7 * recs[0]["kl"], [x["kl"] for x in recs]
    last = recs[-1]
    trained = last["kl_term"] + last.get("ds_term", 0.0) + last.get("aux", 0.0)
    assert last["loss"] == pytest.approx(trained, rel=1e-4)  # the MSE is logged, not trained on
    assert "mse" in last and ("ds" in last) == (objective == "kl+ds")
    info = json.loads((out / "train.json").read_text())
    assert info["done"] and info["train"]["objective"] == objective
    ev = json.loads((out / "eval.json").read_text())
    assert ev["l0"] == pytest.approx(8, abs=0.01)


@pytest.mark.parametrize("extra,needle", [
    (["--objective", "kl", "--arch", "matryoshka"], "--arch matryoshka is not one (its loss reconstructs at several "
                                                    "widths): pass --objective mse"),
    (["--objective", "kl", "--batch-size", "500"], "trains on whole contexts of 128 tokens: pass a --batch-size "
                                                   "multiple of 128"),
    (["--kl-coeff", "2"], "--kl-coeff applies to --objective kl or kl+ds only, and this run trains on mse"),
    (["--objective", "kl", "--ds-coeff", "2"], "--ds-coeff applies to --objective kl+ds only"),
    (["--objective", "kl", "--mfr", "2"], "--objective kl with --mfr: train end-to-end SAEs one at a time"),
    (["--objective", "kl", "--model", "/nonexistent/model"], "could not load model"),
])
def test_bad_e2e_settings_are_one_line_and_write_nothing(extra, needle, store, tmp_path):
    r = _cli("train", "--activations", store, "--out", tmp_path / "o", "--k", 8, "--expansion", 2, "--tokens", 4096,
             "--quiet", *extra)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_e2e_on_a_synthetic_store_names_the_fix(tmp_path):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    planted = write_synthetic(SyntheticConfig(out=str(tmp_path / "p"), d=8, n_true=16, active=2, rows=4096),
                              progress=False)
    r = _cli("train", "--activations", planted, "--out", tmp_path / "o", "--k", 2, "--width", 32, "--objective", "kl",
             "--tokens", 4096, "--quiet")
    assert r.returncode == 2 and "holds no model's text (model 'synthetic'): train it with --objective mse" in r.stderr, \
        r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
