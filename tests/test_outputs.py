"""What the commands may write over, and what stops a run: saelab.outputs' report policy, the run lock, a group
folder's policy, divergence, and the one numeric check of every flag — driven through the CLI."""

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saelab.cli import main
from saelab.errors import SaelabError
from saelab.sae.base import SAE


def _digest(folder: pathlib.Path) -> dict:
    """Every file under ``folder`` by its sha256: a folder is as before when this is equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(argv, capsys, needle) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def two_saes(tmp_path):
    """Two small SAEs of one hook and model, in folders of their own."""
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sae = SAE.create("topk", d_in=16, d_sae=32, k=4, hook_name="blocks.0.hook_resid_post", model_name="tiny")
        folders.append(sae.save(tmp_path / f"sae{seed}"))
    return folders


# ----------------------------------------------------------------------------- report files
@pytest.mark.parametrize("name", ["sae_weights.safetensors", "cfg.json", "features.h5", "eval.json", "train.json",
                                  "labels.json", "manifest.json", "shard_00000.h5"])
def test_a_report_never_replaces_one_of_saelabs_own_files(name, two_saes, capsys):
    """compare --json aimed at an SAE's (or a store's) own file: refused before the work, even with --force, and
    the folder is byte for byte as before."""
    a, b = two_saes
    target = a / name
    if not target.exists():
        target.write_bytes(b"not a report")
    before = _digest(a)
    for force in ([], ["--force"]):
        _fails(["compare", "--sae", a, "--other", b, "--json", target, *force], capsys, "saelab's own files")
    assert _digest(a) == before


def test_a_report_never_replaces_an_input(tmp_path, capsys, demo_group):
    """heads --out aimed at its own task file, and circuit --out at its: refused even with --force, the file
    unchanged."""
    rows = [{"clean": "When Mia and Tom went to the park, Tom gave the ball to",
             "corrupted": "When Mia and Tom went to the park, Sam gave the ball to", "answer": " Mia", "wrong": " Tom"},
            {"clean": "When Ben and Sue went to the park, Sue gave the ball to",
             "corrupted": "When Ben and Sue went to the park, Max gave the ball to", "answer": " Ben", "wrong": " Sue"}]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = path.read_bytes()
    _fails(["heads", "--task", path, "--n", "2", "--out", path, "--force"], capsys, "one of this command's inputs")
    _fails(["circuit", "--task", path, "--saes", demo_group.group, "--n", "2", "--out", path, "--force", "--quiet"],
           capsys, "one of this command's inputs")
    assert path.read_bytes() == before


def test_an_unknown_file_needs_force_and_a_report_of_the_same_command_is_replaced(two_saes, tmp_path, capsys):
    """An existing file saelab did not write is refused without --force; with it, replaced; a report compare wrote
    is replaced on the next run without --force, and the line says so."""
    a, b = two_saes
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    _fails(["compare", "--sae", a, "--other", b, "--json", notes], capsys, "--force to replace it")
    assert json.loads(notes.read_text()) == {"mine": True}
    capsys.readouterr()
    assert main(["compare", "--sae", str(a), "--other", str(b), "--json", str(notes), "--force"]) == 0
    doc = json.loads(notes.read_text())
    assert doc["written_by"].startswith("saelab ") and doc["written_by"].endswith(" compare") and "a_to_b" in doc
    capsys.readouterr()
    assert main(["compare", "--sae", str(a), "--other", str(b), "--json", str(notes)]) == 0
    assert f"wrote {notes} (replaced the existing file)" in capsys.readouterr().out
    # a report of another command is not this one's to replace
    other = tmp_path / "steer.json"
    other.write_text(json.dumps({"written_by": "saelab 0.1.0 steer"}))
    _fails(["compare", "--sae", a, "--other", b, "--json", other], capsys, "not a file saelab compare wrote")


def test_written_by_recognises_reports_and_nothing_else(tmp_path):
    from saelab.outputs import html_generator, written_by

    cases = {"r.json": ('{"written_by": "saelab 9.9 heads"}', "heads", True),
             "c.json": ('{"kind": "sparse_feature_circuit"}', "circuit", True),
             "x.json": ('{"written_by": "saelab 9.9 heads"}', "circuit", False),
             "list.json": ("[1, 2]", "heads", False), "bad.json": ("{not json", "heads", False),
             "cards.html": (f"<html><head>{html_generator('export')}</head>", "export", True),
             "page.html": ('<html><meta name="generator" content="other">', "export", False)}
    for name, (text, command, want) in cases.items():
        (tmp_path / name).write_text(text)
        assert written_by(tmp_path / name, command) is want, name


# ----------------------------------------------------------------------------- one run at a time
def test_a_second_run_into_a_held_folder_is_one_line_naming_the_first(tmp_path):
    """While a run holds its --out (saelab.fs.run_lock), train, harvest and synthetic into it are refused with
    the holder's pid; the folder stays as it was; the lock goes with the run."""
    from saelab.fs import LOCK_NAME, run_lock
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "store"), d=16, n_true=32, active=3, rows=4096,
                                            shard_rows=2048, holdout=0.25), progress=False)
    held = tmp_path / "held"
    held.mkdir()
    runs = [["train", "--activations", store, "--k", "4", "--width", "32", "--batch-size", "256", "--out", held],
            ["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", "1024", "--out", held],
            ["synthetic", "--d", "16", "--n-true", "32", "--rows", "4096", "--out", held]]
    with run_lock(held):
        for argv in runs:
            r = subprocess.run([sys.executable, "-m", "saelab", *map(str, argv), "--quiet"], capture_output=True,
                               text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            assert r.returncode == 2 and f"in use by another saelab run (pid {os.getpid()}" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and [p.name for p in held.iterdir()] == [LOCK_NAME]
    assert not any(held.iterdir())


# ----------------------------------------------------------------------------- a group folder
def test_a_group_trains_only_into_a_new_or_empty_folder_or_its_own(small_run, tmp_path, capsys):
    """train on a RUN folder: a non-empty folder that is not this group's is refused (its files untouched); so is
    --resume into a group of other hooks."""
    cfg, stores = small_run
    run = pathlib.Path(cfg.out)
    base = ["train", "--activations", run, "--k", "4", "--width", "64", "--batch-size", "256", "--tokens", "512",
            "--quiet"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("mine")
    _fails([*base, "--out", busy], capsys, "already exists")
    assert _digest(busy) == {"thesis.tex": hashlib.sha256(b"mine").hexdigest()}
    _fails([*base, "--out", busy, "--resume"], capsys, "no SAE of this group writes")
    other = tmp_path / "other"
    other.mkdir()
    (other / "group.json").write_text(json.dumps({"model": "tiny", "hooks": {"blocks.5.hook_resid_post": "x"}}))
    _fails([*base, "--out", other, "--resume"], capsys, "is a group of other hooks")


# ----------------------------------------------------------------------------- divergence
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A loss that turns NaN at step 5: the run stops with one line naming the step and what to change; no SAE or
    eval.json is written; the checkpoint it keeps (step 4) holds finite weights."""
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "store"), d=16, n_true=32, active=3, rows=8192,
                                            shard_rows=2048, holdout=0.25), progress=False)
    loss = SAE.registry["topk"].loss

    def diverging(self, x, step=0, grads=None):
        out = loss(self, x, step=step, grads=grads)
        if step >= 4:  # the fifth step's update makes every weight NaN
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SAE.registry["topk"], "loss", diverging)
    out = tmp_path / "run"
    err = _fails(["train", "--activations", store, "--k", "4", "--width", "32", "--batch-size", "256", "--out", out,
                  "--log-every", "1", "--checkpoint-every", "4", "--quiet"], capsys, "training diverged at step 5")
    assert "--lr" in err and "checkpoint at step 4" in err
    assert not (out / "sae_weights.safetensors").exists() and not (out / "eval.json").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and all(bool(torch.isfinite(v).all()) for v in ck["sae"].values() if v.is_floating_point())


def test_analyze_refuses_an_sae_with_nan_weights(small_run, tmp_path, capsys):
    cfg, stores = small_run
    store = stores["blocks.0.hook_resid_post"]
    sae = SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name="blocks.0.hook_resid_post", model_name="tiny")
    with torch.no_grad():
        sae.W_dec[3, 5] = math.nan
    folder = sae.save(tmp_path / "nan")
    _fails(["analyze", "--sae", folder, "--activations", store, "--quiet"], capsys, "weights hold NaN or inf")
    assert not (folder / "features.h5").exists()


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("argv,needle", [
    (["heads", "--task", "induction", "--n", str(10**30)], "--n 1000000000000000000000000000000 is out of range"),
    (["circuit", "--task", "induction", "--saes", "X", "--node-threshold", "nan"], "--node-threshold nan"),
    (["circuit", "--task", "induction", "--saes", "X", "--ig-steps", str(2**70)], "--ig-steps"),
    (["train", "--activations", "X", "--out", "Y", "--tokens", str(10**25)], "--tokens"),
    (["train", "--activations", "X", "--out", "Y", "--arch", "gradient", "--grad-beta", "inf"], "--grad-beta inf"),
    (["synthetic", "--out", "Y", "--rows", str(10**40)], "--rows"),
    (["eval", "--sae", "X", "--contexts", str(-(10**30))], "--contexts"),
])
def test_numbers_off_their_range_are_one_line(argv, needle, capsys):
    _fails(argv, capsys, needle)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["context_size", "batch_size", "shard_rows", "holdout", "seed", "tokens"]),
                       st.one_of(st.integers(min_value=-(10**30), max_value=10**30),
                                 st.floats(allow_nan=True, allow_infinity=True))))
def test_harvest_config_takes_any_numbers_without_a_traceback(values):
    """60 examples: any numbers in HarvestConfig's numeric fields either validate or raise a SaelabError."""
    from saelab.config import HarvestConfig

    cfg = HarvestConfig(hooks=["blocks.0.hook_resid_post"], out="o", **values)
    try:
        cfg.validate()
    except SaelabError:
        return
    for k, v in values.items():
        assert not (isinstance(v, float) and not math.isfinite(v)), (k, v)
        assert abs(v) <= 2**62, (k, v)
