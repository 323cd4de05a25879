"""Mutual feature regularisation (``saelab train --mfr N``): the blocked MMCS penalty against its dense reference,
the group's folder as a user gets it, a member at --mfr-coeff 0 equal to the same SAE trained alone, the penalty
aligning the members, kill -9 + --resume, and the one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from saelab.sae import SAE, mutual

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "saelab", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("mfr") / "planted"
    return write_synthetic(SyntheticConfig(out=str(out), d=16, n_true=48, active=3, rows=16384, shard_rows=4096,
                                           holdout=0.125), progress=False)


def _train(store, out, *extra):
    return _cli("train", "--activations", store, "--out", out, "--arch", "topk", "--k", "3", "--width", "64",
                "--batch-size", "256", "--tokens", 256 * 120, "--lr", "3e-3", "--quiet", *extra)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_mmcs_and_its_gradients_match_the_dense_reference(seed, monkeypatch):
    """Fresh random dictionaries in fp64, blocks of 7 rows (so the last block is partial): values and gradients
    within 1e-12."""
    monkeypatch.setattr(mutual, "BLOCK_ELEMENTS", 7 * 50)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(61, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, 12, generator=g, dtype=torch.float64, requires_grad=True)
    got = mutual.mmcs(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    want = mutual.mmcs_reference(a, b)
    wa, wb = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, wa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, wb, rtol=1e-12, atol=1e-12)


def test_the_penalty_is_zero_for_one_dictionary_reordered_and_the_mean_over_pairs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 8, generator=g)
    b = a[torch.randperm(40, generator=g)] * 3.0  # the same atoms, reordered and rescaled
    assert float(mutual.penalty([a, b])) == pytest.approx(0.0, abs=1e-6)
    c = torch.randn(40, 8, generator=g)
    three = float(mutual.penalty([a, b, c]))
    pairs = [float(mutual.mmcs(x, y)) for x, y in ((a, b), (a, c), (b, c))]
    assert three == pytest.approx(1 - sum(pairs) / 3, abs=1e-6)
    assert 0 < three < 1


@pytest.fixture(scope="module")
def groups(planted, tmp_path_factory):
    """One SAE alone, and two MFR groups of 2 from the same seed: at --mfr-coeff 0 and at 1."""
    root = tmp_path_factory.mktemp("mfr_runs")
    runs = {"alone": root / "alone", "free": root / "free", "mfr": root / "mfr"}
    for name, extra in (("alone", ()), ("free", ("--mfr", 2, "--mfr-coeff", 0)),
                        ("mfr", ("--mfr", 2, "--mfr-coeff", 1))):
        r = _train(planted, runs[name], *extra)
        assert r.returncode == 0, r.stderr
        runs[name + "_stdout"] = r.stdout
    return runs


def test_a_group_is_a_folder_of_member_sae_folders_with_its_record(groups, capsys):
    out = groups["mfr"]
    meta = json.loads((out / "mfr.json").read_text())
    assert meta["members"] == ["sae-0", "sae-1"] and meta["coeff"] == 1 and meta["arch"] == "topk"
    assert set(meta["mmcs"]) == {"0/1"} and 0 < meta["mmcs"]["0/1"] <= 1
    for name in meta["members"]:
        sae = SAE.load(out / name)  # each member is a whole SAE folder
        assert sae.cfg.d_sae == 64
        ev = json.loads((out / name / "eval.json").read_text())
        assert ev["fvu"] < 0.5
        info = json.loads((out / name / "train.json").read_text())
        assert info["done"] and info["mfr_member"] == int(name[-1]) and info["init_seed"] == int(name[-1])
        recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["step"] == 120 and 0 <= recs[-1]["mfr_penalty"] <= 1
        assert recs[-1]["mfr_mmcs"] == pytest.approx(1 - recs[-1]["mfr_penalty"])
    assert json.loads((out / "train.json").read_text())["done"] and not (out / "checkpoint.pt").exists()
    assert "MFR group of 2 (--mfr-coeff 1); decoder MMCS sae-0/sae-1" in groups["mfr_stdout"]
    # the group folder is not one SAE: saelab says which folders are
    r = _cli("eval", "--sae", out)
    assert r.returncode == 2 and "is an MFR group of 2 SAEs of one hook: pass one of its members" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_at_coeff_0_a_member_trains_as_it_would_alone_and_the_penalty_aligns_the_members(groups):
    alone, free = SAE.load(groups["alone"]), SAE.load(groups["free"] / "sae-0")
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):  # same init, same batches, its own gradient
        torch.testing.assert_close(getattr(free, n), getattr(alone, n), rtol=1e-5, atol=1e-6)
    other = SAE.load(groups["free"] / "sae-1")
    assert not torch.allclose(other.W_dec, free.W_dec, atol=1e-3)  # seed + 1: another init
    aligned = json.loads((groups["mfr"] / "mfr.json").read_text())["mmcs"]["0/1"]
    independent = json.loads((groups["free"] / "mfr.json").read_text())["mmcs"]["0/1"]
    assert aligned > independent + 0.02, (aligned, independent)


def test_kill9_and_resume_of_a_group_ends_where_the_uninterrupted_group_does(planted, groups, tmp_path):
    args = ["train", "--activations", planted, "--arch", "topk", "--k", "3", "--width", "64", "--batch-size", "256",
            "--tokens", 256 * 120, "--lr", "3e-3", "--quiet", "--mfr", 2, "--mfr-coeff", 1, "--checkpoint-every", 10]
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "saelab", *map(str, args), "--out", str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "mfr.json").exists(), "killed too late: raise --tokens"
    r = _cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    for name in ("sae-0", "sae-1"):
        a, b = SAE.load(groups["mfr"] / name), SAE.load(out / name)
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(b, n), getattr(a, n), rtol=1e-4, atol=1e-5)
        steps = [json.loads(line)["step"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 120
    r = _cli(*args, "--out", out, "--resume")  # a finished group: nothing to do
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("extra,needle", [
    (["--mfr", "1"], "--mfr 1 trains one SAE, and mutual feature regularisation aligns two or more: pass --mfr 2"),
    (["--mfr-coeff", "0.5"], "--mfr-coeff applies with --mfr N only, and this run trains one SAE"),
    (["--mfr-warmup", "0.5"], "--mfr-warmup applies with --mfr N only"),
    (["--mfr", "-2"], "--mfr -2 is out of range"),
    (["--mfr", "2", "--mfr-coeff", "-1"], "--mfr-coeff -1.0: pass a finite number at least 0.0"),
])
def test_bad_mfr_settings_are_one_line_and_write_nothing(extra, needle, planted, tmp_path):
    r = _cli("train", "--activations", planted, "--out", tmp_path / "o", "--k", "3", "--width", "64", "--tokens",
             4096, "--quiet", *extra)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_mfr_on_a_run_folder_of_several_hooks_names_the_hook_flag(small_run, tmp_path):
    r = _cli("train", "--activations", small_run[0].out, "--out", tmp_path / "o", "--k", "4", "--expansion", "2",
             "--tokens", 4096, "--mfr", 2, "--quiet")
    assert r.returncode == 2, r.stderr
    assert "--mfr trains its 2 SAEs on one store" in r.stderr and "pick one with --hook" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
