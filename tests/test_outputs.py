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

pytest.importorskip("hypothesis")  # the [dev] extra has it; the TransformerLens 3.9 environment (make test-tl3) not
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

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
def test_a_second_run_into_a_held_folder_is_one_line_naming_the_first(tmp_path, capsys):
    """While a run holds its --out (saelab.fs.run_lock: flock, which another open of the file cannot take, in this
    process or another), train, harvest and synthetic into it are refused with the holder's pid; the folder stays as
    it was; the lock goes with the run."""
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
            _fails([*argv, "--quiet"], capsys, f"in use by another saelab run (pid {os.getpid()}")
            assert [p.name for p in held.iterdir()] == [LOCK_NAME]
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


# ----------------------------------------------------------------------------- what saelab reads
def test_names_from_files_stay_inside_their_folder(planted_store, tmp_path, capsys):
    """A manifest whose shard names a path (../…) and a group.json whose SAE folder does are refused in one line:
    nothing a file says leads a reader outside its folder."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(planted_store, store)
    m = json.loads((store / "manifest.json").read_text())
    m["shards"][0]["file"] = "../" + m["shards"][0]["file"]
    (store / "manifest.json").write_text(json.dumps(m))
    _fails(["train", "--activations", store, "--out", tmp_path / "o", "--quiet"], capsys,
           "shards[0].file: '../shard_00000.h5' is not a name inside its folder")
    group = tmp_path / "group"
    group.mkdir()
    (group / "group.json").write_text(json.dumps({"model": "tiny", "hooks": {"blocks.0.hook_resid_post": "../x"}}))
    _fails(["eval", "--sae", group], capsys, "not a valid group file: hooks[\"blocks.0.hook_resid_post\"]: '../x' is not a name")


def test_a_fifo_is_refused_not_read(planted_store, tmp_path):
    """A FIFO where saelab reads a file (an SAE's cfg.json, a store's manifest or shard) is a one-line error at
    once; reading it would wait forever."""
    import shutil

    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=64, d_sae=128, k=4).save(tmp_path / "sae")
    (sae / "cfg.json").unlink()
    os.mkfifo(sae / "cfg.json")
    store = tmp_path / "store"
    shutil.copytree(planted_store, store)
    shard = store / json.loads((store / "manifest.json").read_text())["shards"][0]["file"]
    shard.unlink()
    os.mkfifo(shard)
    for argv in (["eval", "--sae", sae], ["train", "--activations", store, "--out", tmp_path / "o"]):
        r = subprocess.run([sys.executable, "-m", "saelab", *map(str, argv), "--quiet"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and "is not a regular file" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


_JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20)
                     | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)


@settings(max_examples=80, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: _JSON for k in
                                           ("format_version", "model", "hook", "d_in", "dtype", "context_size",
                                            "bos_included", "seed", "dataset", "n_tokens", "holdout_shards",
                                            "has_grads", "head_layout", "shards", "complete")}))
def test_read_manifest_takes_any_json_without_a_traceback(tmp_path_factory, doc):
    """80 examples: a manifest.json of any JSON values under its keys is read or refused with a SaelabError naming
    the file; what it accepts has shard names that are names and holdout shards among them."""
    from saelab.store import read_manifest

    folder = tmp_path_factory.mktemp("m")
    (folder / "manifest.json").write_text(json.dumps(doc, allow_nan=True))
    try:
        m = read_manifest(folder)
    except SaelabError as e:
        assert str(folder) in str(e)
        return
    assert all("/" not in s["file"] for s in m["shards"]) and set(m["holdout_shards"]) <= {s["file"] for s in m["shards"]}


def test_sigterm_leaves_no_temp_file_and_the_run_resumes(tmp_path):
    """SIGTERM mid-harvest ends it as Ctrl-C does: exit 130 with one line naming --resume, no temp file left, every
    listed shard whole; --resume then finishes the store."""
    import signal
    import time

    from saelab.store import ActivationStore, read_manifest

    out = tmp_path / "run"
    hook = "blocks.0.hook_resid_post"
    args = [sys.executable, "-m", "saelab", "harvest", "--hook", hook, "--tokens", str(128 * 48), "--shard-rows",
            str(128 * 4), "--batch-size", "1", "--quiet", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not list((out / hook).glob("shard_*.h5")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1].strip()
    assert p.returncode == 130 and err.startswith("saelab: interrupted") and "--resume" in err, err
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]
    ActivationStore(out / hook).check_shards()  # every shard the manifest lists is whole (checksummed)
    assert read_manifest(out / hook)["complete"] is False
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    m = read_manifest(out / hook)
    assert m["complete"] and m["n_tokens"] == 128 * 48


def test_a_run_that_cannot_fit_is_refused_before_it_starts(planted_store, tmp_path, capsys, monkeypatch):
    """A filesystem with less free space than the run will write: harvest and train stop with one line naming
    both sizes before writing anything (no --out left behind)."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 20, 1 << 20, 1024))
    out = tmp_path / "h"
    _fails(["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", "4096", "--out", out, "--quiet"], capsys,
           "GiB free")
    assert not out.exists()
    out = tmp_path / "t"
    _fails(["train", "--activations", planted_store, "--k", "4", "--width", "128", "--out", out, "--quiet"], capsys,
           "GiB free")
    assert not out.exists()


def _circuit(**change):
    c = {"kind": "sparse_feature_circuit", "format_version": 1, "model": "tiny", "group": "g",
         "saes": {"blocks.0.hook_resid_post": "g/a"}, "hooks": ["blocks.0.hook_resid_post"],
         "task": {"name": "t", "n_examples": 2, "metric": "logit_diff", "accuracy": 1.0}, "method": "attrib",
         "ig_steps": 10, "node_threshold": 0.1, "edge_threshold": 0.01,
         "nodes": [{"id": "blocks.0.hook_resid_post/3", "hook": "blocks.0.hook_resid_post", "layer": 0,
                    "kind": "latent", "latent": 3, "effect": 0.5}],
         "edges": [], "faithfulness": {"nodes": 0.9, "edges": 0.8}, "metric_values": {"full": 1.0, "empty": 0.0,
                                                                                      "circuit": 0.9}}
    c.update(change)
    return c


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(_circuit())), _JSON, st.sampled_from(["top", "node", "edge"]))
def test_load_circuit_takes_any_damage_without_a_traceback(tmp_path_factory, key, value, where):
    """80 examples: one value of a valid circuit file (top-level, in its node, or in an edge) replaced by any JSON
    value: load_circuit accepts it or refuses it with a SaelabError naming the file; what it accepts keeps every
    type the app's Circuits page draws from."""
    from saelab.analysis.circuits import load_circuit

    c = _circuit()
    if where == "top":
        c[key] = value
    elif where == "node":
        c["nodes"][0][sorted(c["nodes"][0])[hash(key) % 6]] = value
    else:
        c["edges"] = [{"src": value, "dst": "blocks.0.hook_resid_post/3", "weight": 1.0}]
    path = tmp_path_factory.mktemp("c") / "c.json"
    path.write_text(json.dumps(c))
    try:
        got = load_circuit(path)
    except SaelabError as e:
        assert str(path) in str(e)
        return
    for n in got["nodes"]:
        assert isinstance(n["id"], str) and (n["effect"] is None or isinstance(n["effect"], (int, float)))
        assert n["layer"] is None or isinstance(n["layer"], int)
    for group in ("faithfulness", "metric_values"):
        for k in ("nodes", "edges", "full", "empty", "circuit"):
            v = (got.get(group) or {}).get(k)
            assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), (group, k, v)


def test_the_circuits_page_shows_a_damaged_file_as_a_message(demo_group, tmp_path):
    """A circuit file with a node id that is a list (it crashed the page): the Circuits page shows one error, no
    exception."""
    from streamlit.testing.v1 import AppTest

    from saelab.app import HOME

    bad = _circuit(nodes=[{"id": ["x"], "hook": "blocks.0.hook_resid_post", "layer": 0, "kind": "latent",
                           "latent": 3, "effect": 0.5}])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    at = AppTest.from_file(str(HOME.parent / "pages" / "3_Circuits.py"), default_timeout=120)
    os.environ["SAELAB_APP_SAE"] = str(demo_group.group)
    try:
        at.run()
        at.text_input(key="circuit_path").input(str(path)).run()
    finally:
        os.environ.pop("SAELAB_APP_SAE", None)
    assert not at.exception, at.exception
    assert any("is not a valid circuit file" in e.value for e in at.error), [e.value for e in at.error]


def _limited(size):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


@pytest.mark.parametrize("cmd,kept", [
    (["synthetic", "--d", "64", "--n-true", "128", "--rows", "65536"], False),  # no resume: the half store goes
    (["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", "65536"], True),  # resumable, nothing torn
])
def test_a_write_limit_is_one_line_and_leaves_no_temp_file(cmd, kept, tmp_path):
    """Under a file-size limit (ulimit -f: a write fails as on a full disk) a store's first shard cannot be
    written: one line naming the file, no temp file, and either no store (synthetic) or a resumable one with every
    listed shard whole (harvest)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "saelab", *cmd, "--out", str(out), "--quiet"], capture_output=True,
                       text=True, timeout=600, preexec_fn=_limited(200_000), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "could not be written (File too large)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert out.exists() == kept
    if kept:
        from saelab.store import ActivationStore

        store = ActivationStore(out / "blocks.0.hook_resid_post")
        store.check_shards()
        assert store.manifest["complete"] is False


def test_training_under_a_write_limit_is_one_line(planted_store, tmp_path):
    """train whose checkpoint cannot be written: one line, no temp file beside the run's files."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "saelab", "train", "--activations", str(planted_store), "--k", "4",
                        "--width", "4096", "--batch-size", "256", "--tokens", "4096", "--checkpoint-every", "2",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600,
                       preexec_fn=_limited(1_000_000), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "could not be written (File too large)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_path_the_filesystem_refuses_is_one_line(planted_store, tmp_path, capsys):
    """A name too long for the filesystem, or a path through a file, is one line naming the path and the fix
    wherever a command meets it (the check of --out, or a write later on), and nothing is left behind."""
    long = tmp_path / ("a" * 300)
    _fails(["synthetic", "--rows", "1024", "--out", long, "--quiet"], capsys, "File name too long: choose a shorter")
    _fails(["train", "--activations", planted_store, "--out", long, "--quiet"], capsys, "choose a shorter name")
    sae = SAE.create("topk", d_in=64, d_sae=128, k=4).save(tmp_path / "sae")
    _fails(["compare", "--sae", sae, "--other", sae, "--json", tmp_path / ("b" * 300 + ".json")], capsys,
           "choose a shorter name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_a_device_this_torch_cannot_use_is_one_line(tmp_path, capsys):
    """--device of a type torch parses but this build (or saelab) cannot run on is one line in every command that
    takes --device, before anything runs (torch's own errors were tracebacks: meta, mps, xpu)."""
    sae = SAE.create("topk", d_in=64, d_sae=128, k=4).save(tmp_path / "sae")
    for dev in ("meta", "xpu", "mps", "cuda:7"):
        for argv in (["eval", "--sae", sae], ["compare", "--sae", sae, "--other", sae],
                     ["train", "--activations", tmp_path / "none", "--out", tmp_path / "o"]):
            err = _fails([*argv, "--device", dev, "--quiet"] if argv[0] != "compare" else [*argv, "--device", dev],
                         capsys, f"--device {dev}")
            assert "cpu" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_a_symlink_loop_is_one_line(tmp_path, capsys):
    sae = SAE.create("topk", d_in=64, d_sae=128, k=4).save(tmp_path / "sae")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    _fails(["compare", "--sae", sae, "--other", tmp_path / "loop1"], capsys, "loops through symbolic links")
    _fails(["compare", "--sae", sae, "--other", sae, "--json", tmp_path / "loop1"], capsys,
           "loops through symbolic links")


@pytest.mark.parametrize("damage", ["nan", "constant"])
def test_train_ends_with_one_line_on_held_out_rows_without_an_fvu(damage, tmp_path, capsys):
    """The end-of-run evaluation over held-out rows holding a NaN, or holding one row over and over (no variance),
    names the store (as saelab eval does), and no eval.json with a NaN or a meaningless FVU is written."""
    import h5py

    from saelab.fs import sha256_file
    from saelab.store import read_manifest
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "syn"), d=16, n_true=32, rows=8192), progress=False)
    m = read_manifest(store)
    held = next(s for s in m["shards"] if s["file"] in m["holdout_shards"])
    with h5py.File(store / held["file"], "r+") as f:
        if damage == "nan":
            f["activations"][3, 2] = float("nan")
        else:
            f["activations"][...] = 1.0
    held["sha256"] = sha256_file(store / held["file"])
    (store / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "sae"
    needle = "rows hold NaN or inf values" if damage == "nan" else "rows are constant (no variance)"
    err = _fails(["train", "--activations", store, "--out", out, "--tokens", "4096", "--batch-size", "512",
                  "--width", "64", "--k", "4", "--quiet"], capsys, needle)
    assert str(store) in err and "bug" not in err, err
    assert not (out / "eval.json").exists()
