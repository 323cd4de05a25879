"""Harvest: rows equal an independent run_with_cache, grads equal autograd, resume, checksums, errors."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from saelab.config import HarvestConfig
from saelab.errors import SaelabError
from saelab.harvest import harvest
from saelab.store import ActivationStore, read_manifest

pytestmark = pytest.mark.tl3


def _cached(model, tokens, hook):
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.from_numpy(tokens).long(), names_filter=[hook])
    t = cache[hook]
    return t.reshape(t.shape[0] * t.shape[1], -1).numpy()


def test_rows_equal_run_with_cache(tiny, small_run):
    cfg, stores = small_run
    for hook, path in stores.items():
        store = ActivationStore(path)
        m = store.manifest
        assert m["n_tokens"] == 60 * 128 and m["context_size"] == 128 and m["bos_included"]
        assert len(m["holdout_shards"]) == 1 and m["shards"][-1]["file"] in m["holdout_shards"]
        toks = store.tokens("all")
        assert (toks[:, 0] == tiny.tokenizer.bos_token_id).all()
        ref = _cached(tiny, toks, hook)
        got = store.rows(np.arange(store.n_rows("all"))).numpy()
        assert np.abs(got - ref).max() <= 1e-5
    z = read_manifest(stores["blocks.1.attn.hook_z"])
    assert z["head_layout"] == {"n_heads": tiny.cfg.n_heads, "d_head": tiny.cfg.d_head}


def test_fp16_and_grads(tiny, tmp_path):
    hook = "blocks.0.hook_resid_post"
    cfg = HarvestConfig(hooks=[hook], out=str(tmp_path / "g"), tokens=128 * 4, shard_rows=256, holdout=0,
                        dtype="float16", with_grads=True, batch_size=2)
    store = ActivationStore(harvest(cfg, progress=False, model=tiny)[hook])
    toks = store.tokens()
    acts = store.rows(np.arange(store.n_rows("all"))).numpy()
    ref = _cached(tiny, toks, hook)
    assert acts.dtype == np.float16
    np.testing.assert_allclose(acts.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    # gradient via torch.autograd on the model directly: replace the activation by a leaf
    x = torch.from_numpy(toks).long()
    leaf = {}

    def swap(t, hook):
        leaf["a"] = t.detach().clone().requires_grad_(True)
        return leaf["a"]

    logits = tiny.run_with_hooks(x, fwd_hooks=[(hook, swap)])
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    (g,) = torch.autograd.grad(loss, leaf["a"])
    grads = store.rows(np.arange(store.n_rows("all")), what="grads").numpy().astype(np.float32)
    g = g.reshape(-1, g.shape[-1]).numpy()
    assert np.abs(grads - g).max() <= 1e-3 * np.abs(g).max() + 1e-6


def _checksums(run):
    return {h.name: [s["sha256"] for s in read_manifest(h)["shards"]] for h in sorted(run.iterdir()) if h.is_dir()}


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)


HARVEST_ARGS = ["harvest", "--hook", "blocks.0.hook_resid_post", "--hook", "blocks.1.hook_mlp_out",
                "--tokens", str(128 * 120), "--shard-rows", str(128 * 6), "--batch-size", "6", "--quiet"]


def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    r = _cli(*HARVEST_ARGS, "--out", str(full))
    assert r.returncode == 0, r.stderr
    part = tmp_path / "part"
    p = subprocess.Popen([sys.executable, "-m", "saelab", *HARVEST_ARGS, "--out", str(part)],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = part / "blocks.1.hook_mlp_out" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not json.loads(manifest.read_text()).get("complete"), "killed too late to test resume"
    again = _cli(*HARVEST_ARGS, "--out", str(part))
    assert again.returncode == 2 and "--resume" in again.stderr
    r = _cli(*HARVEST_ARGS, "--out", str(part), "--resume")
    assert r.returncode == 0, r.stderr
    assert _checksums(part) == _checksums(full)  # same seed: byte-identical shards
    assert read_manifest(part / "blocks.0.hook_resid_post")["complete"]


def test_flipped_byte_detected_before_rows_served(small_run, tmp_path):
    import shutil

    _, stores = small_run
    src = stores["blocks.0.hook_resid_post"]
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    shard = dst / read_manifest(dst)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    store = ActivationStore(dst)
    with pytest.raises(SaelabError, match="corrupted"):
        store.rows([0])
    with pytest.raises(SaelabError, match="corrupted"):
        next(iter(store.batches(64, shuffle=False)))


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model-xyz", "--hook", "blocks.0.hook_resid_post"], "could not load model"),
    (["--hook", "blocks.0.hook_resid_pots"], "did you mean blocks.0.hook_resid_post"),
    (["--hook", "blocks.0.hook_resid_post", "--tokens", "100000000"], "provides"),
    (["--hook", "blocks.0.hook_resid_post", "--dataset", "/no/such/file.txt"], "--dataset"),
    (["--hook", "blocks.0.attn.hook_pattern", "--tokens", "2048", "--context-size", "16"], "per-position hook"),
    (["--hook", "blocks.1.hook_mlp_in", "--tokens", "512"],
     "hook 'blocks.1.hook_mlp_in' never runs in this model (TransformerLens's use_hook_mlp_in is off): harvest "
     "blocks.1.ln2.hook_normalized (the MLP's input) instead"),
    (["--hook", "blocks.0.hook_resid_post", "--seed", "-1"], "--seed must be 0 or more"),
    (["--model", "FAKE", "--hook", "blocks.0.hook_resid_post"], "could not load the model in the local folder"),
])
def test_errors_are_one_line(tmp_path, args, needle, capsys):
    if "FAKE" in args:  # a local folder that is no model (config.json without model_type)
        (tmp_path / "fake").mkdir()
        (tmp_path / "fake" / "config.json").write_text("{}")
        args = [str(tmp_path / "fake") if a == "FAKE" else a for a in args]
    argv = ["harvest", *args, "--out", str(tmp_path / "o"), "--quiet"]
    if needle == "could not load model":  # one case through the installed entry point, in a process of its own
        r = _cli(*argv)
        rc, err = r.returncode, r.stderr
    else:  # the rest through the same main() in this process (a subprocess costs ~12 s of imports each)
        from saelab.cli import main

        capsys.readouterr()
        rc, err = main(argv), capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # a failed run leaves no empty --out behind


def test_unwritable_out(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/saelab-out"  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "o")
    r = _cli("harvest", "--hook", "blocks.0.hook_resid_post", "--out", target, "--quiet")
    assert r.returncode == 2 and "writ" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_demo_cli_harvests_and_reruns(tmp_path):
    """`saelab demo` (what `make demo` runs, with --no-app as CI implies) writes both stores and
    prints them; running it again reuses the finished run instead of failing."""
    out = tmp_path / "activations" / "demo"
    for first in (True, False):
        r = _cli("demo", "--dir", str(tmp_path), "--tokens", "16384", "--train-tokens", "16384", "--no-app", "--quiet")
        assert r.returncode == 0, r.stderr
        assert "blocks.1.hook_resid_post" in r.stdout and "CE-loss recovered" in r.stdout
        assert ("demo: harvesting" in r.stdout and "wrote 2 stores" in r.stdout) if first else \
            ("demo: reusing the finished demo" in r.stdout and "the 2 stores" in r.stdout), r.stdout
    group = json.loads((tmp_path / "runs" / "demo" / "group.json").read_text())
    assert set(group["hooks"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    for hook in ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]:
        m = read_manifest(out / hook)
        assert m["complete"] and m["n_tokens"] == 16384
        assert ActivationStore(out / hook).n_rows("all") == 16384


def test_resume_accepts_the_same_out_written_differently(tmp_path, monkeypatch, capsys):
    from saelab.cli import main

    args = ["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", str(16 * 8), "--context-size", "16",
            "--shard-rows", "64", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path / "run") + "/", "run", "./run"):
        assert main([*args, "--out", out, "--resume"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--hook", "blocks.0.hook_resid_post", "--nproc", "0"], "--nproc 0"),
    (["--hook", "blocks.0.hook_resid_post", "--nproc", "-2"], "--nproc -2"),
    (["--hook", "blocks.0.hook_resid_post", "--hook", "blocks.1.hook_resid_post", "--hook",
      "blocks.0.hook_resid_post"], "--hook blocks.0.hook_resid_post is given more than once"),
])
def test_bad_values_refused_before_anything_is_written(tmp_path, capsys, args, needle):
    from saelab.cli import main

    out = tmp_path / "o"
    assert main(["harvest", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("saelab: error:"), err
    assert not out.exists()


def test_resume_accepts_a_local_dataset_written_differently(tmp_path, monkeypatch, capsys):
    """--dataset of a local file is recorded absolute, so a relative and an absolute spelling are one
    dataset on --resume; a run recorded with a relative path (older saelab) resumes from the same folder."""
    from saelab.cli import main

    words = "the cat sat on a mat and then it ran to the park where a dog was".split()
    text = "\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(30))
    (tmp_path / "data.txt").write_text(text)
    (tmp_path / "other.txt").write_text(text.upper())
    monkeypatch.chdir(tmp_path)
    args = ["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", str(16 * 8), "--context-size", "16",
            "--shard-rows", "64", "--out", "run", "--quiet"]
    assert main([*args, "--dataset", "data.txt"]) == 0, capsys.readouterr().err
    run_file = tmp_path / "run" / "harvest.json"
    info = json.loads(run_file.read_text())
    assert info["config"]["dataset"] == str(tmp_path.resolve() / "data.txt")
    assert main([*args, "--dataset", str(tmp_path / "data.txt"), "--resume"]) == 0, capsys.readouterr().err
    info["config"]["dataset"] = "data.txt"  # as an older saelab recorded it
    run_file.write_text(json.dumps(info))
    for spelling in ("data.txt", "./data.txt", str(tmp_path / "data.txt")):
        assert main([*args, "--dataset", spelling, "--resume"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*args, "--dataset", "other.txt", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different settings" in err and len(err.splitlines()) == 1, err
    assert f"(--dataset: the run has {tmp_path / 'data.txt'}, this command " in err and "other.txt" in err, err


def test_a_local_model_folder_is_recorded_absolute(tmp_path, monkeypatch, capsys):
    """--model of a local folder is recorded as its absolute path (the manifest's model then loads from
    any working folder), and a relative and an absolute spelling are one model on --resume."""
    from saelab.cli import main
    from saelab.models import TINY_DIR
    from saelab.store import read_manifest

    (tmp_path / "m").symlink_to(TINY_DIR, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    args = ["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", str(16 * 8), "--context-size", "16",
            "--shard-rows", "64", "--out", "run", "--quiet"]
    assert main([*args, "--model", "m"]) == 0, capsys.readouterr().err
    assert read_manifest(tmp_path / "run" / "blocks.0.hook_resid_post")["model"] == str(pathlib.Path(TINY_DIR).resolve())
    assert main([*args, "--model", str(TINY_DIR), "--resume"]) == 0, capsys.readouterr().err


def test_failed_harvest_leaves_no_new_folder(tmp_path, capsys):
    """A run failing after --out was created (here: an unknown hook, found once the model is loaded) removes
    the folders it created and left empty, missing parents included; an existing empty --out stays."""
    from saelab.cli import main

    args = ["harvest", "--hook", "blocks.0.hook_resid_pots", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a" / "b" / "o")]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    assert main([*args, "--out", str(tmp_path / "empty")]) == 2
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("text,needle", [("{bad", "harvest.json is not a valid harvest record: not JSON ("),
                                                 ("null", "harvest.json is not a valid harvest record: the top level: None is not an object"),
                                                 ('{"config": {"tokens": "many"}}', "config.tokens: 'many' is not a whole number")])
def test_resume_with_a_damaged_record_is_one_line(text, needle, tmp_path, capsys):
    """--resume on a run whose harvest.json is damaged: one line (it was a JSONDecodeError / TypeError)."""
    from saelab.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "harvest.json").write_text(text)
    assert main(["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", "512", "--out", str(out),
                 "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "harvest to a new --out" in err and len(err.splitlines()) == 1, err


def test_demo_checks_its_token_flags_before_harvesting(tmp_path, capsys):
    from saelab.cli import main

    for flag in ("--tokens", "--train-tokens"):
        assert main(["demo", "--dir", str(tmp_path), flag, "0", "--no-app", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"saelab: error: {flag} must be positive (got 0)", err
    assert not any(tmp_path.iterdir())  # nothing harvested


def test_resume_harvests_a_damaged_shard_again(tmp_path, capsys):
    """--resume checks the checksums of the shards it keeps: from a damaged (or missing) one on, it harvests
    again, to the same bytes as an undamaged run (it used to keep the damaged shard and mark the store complete)."""
    from saelab.cli import main

    out = tmp_path / "run"
    args = ["harvest", "--hook", "blocks.0.hook_resid_post", "--tokens", str(16 * 8), "--context-size", "16",
            "--shard-rows", "32", "--holdout", "0", "--out", str(out), "--quiet"]
    assert main(args) == 0
    store = out / "blocks.0.hook_resid_post"
    m = read_manifest(store)
    want = [s["sha256"] for s in m["shards"]]
    assert len(want) == 4
    (store / m["shards"][1]["file"]).write_bytes(b"damaged")
    m["complete"] = False  # as if killed before the end
    (store / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{store / m['shards'][1]['file']} is damaged: harvesting it and the 2 shard(s) after it again" in err, err
    m2 = read_manifest(store)
    assert m2["complete"] and [s["sha256"] for s in m2["shards"]] == want
    ActivationStore(store).check_shards()


def test_a_hook_pattern_leaves_out_hooks_it_cannot_harvest(tmp_path, capsys):
    """A pattern's matches that the forward never reaches (the bridge's attn.qkv aliases) or that are per pair of
    positions (hook_pattern, hook_attn_scores) are left out and said on stderr; the rest are harvested. The same
    hook named alone stays an error (test_errors_are_one_line)."""
    from saelab.cli import main

    out = tmp_path / "run"
    assert main(["harvest", "--hook", "blocks.0.attn.*", "--tokens", "256", "--context-size", "16",
                 "--shard-rows", "128", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "saelab: the hook pattern(s) also matched" in err and "harvesting the other" in err, err
    got = json.loads((out / "harvest.json").read_text())["hooks"]
    assert "blocks.0.attn.hook_z" in got and "blocks.0.attn.hook_pattern" not in got, got
    assert not any("qkv" in h for h in got), got
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(got)
    for h in got:
        assert read_manifest(out / h)["complete"]
