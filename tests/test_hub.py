"""saelab fetch: a pretrained SAE from the Hugging Face hub into an SAE folder, offline against a
hand-built hub cache (the layout huggingface_hub reads: refs/main → snapshots/<commit>/… → blobs)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from saelab.errors import SaelabError
from saelab.sae.base import SAE

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/tiny-saes"
HOOK = "blocks.0.hook_resid_post"


def _put(cache, repo, path, data: bytes):
    """One file of a cached repo snapshot, stored as huggingface_hub stores it (a symlink to a blob)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "snapshots" / COMMIT / path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _saelens_sae(cache, tmp_path, sub=HOOK, arch="standard", old=False, hook=HOOK, model="tiny", nan=False):
    """A SAELens-format SAE (no saelab block in cfg.json) in the cache; returns its weights. ``old``: the
    config as older SAELens wrote it (hook_point, expansion_factor instead of d_sae, no architecture); ``nan``:
    one decoder entry NaN (a diverged run's)."""
    torch.manual_seed(0)
    w = {"W_enc": torch.randn(128, 256), "b_enc": torch.randn(256), "W_dec": torch.randn(256, 128),
         "b_dec": torch.randn(128)}
    if nan:
        w["W_dec"][3, 5] = float("nan")
    save_file(w, tmp_path / "w.safetensors")
    cfg = {"architecture": arch, "d_in": 128, "d_sae": 256, "hook_name": hook, "model_name": model, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none"}
    if old:
        cfg = {"d_in": 128, "expansion_factor": 2, "hook_point": HOOK, "model_name": "tiny", "dtype": "torch.float32"}
    _put(cache, REPO, f"{sub}/cfg.json", json.dumps(cfg).encode())
    _put(cache, REPO, f"{sub}/sae_weights.safetensors", (tmp_path / "w.safetensors").read_bytes())
    return w


def test_fetch_from_the_cli_writes_an_sae_folder_and_reruns(tmp_path, small_run, capsys):
    cache = tmp_path / "hub"
    w = _saelens_sae(cache, tmp_path)
    out = tmp_path / "runs" / "fetched"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    for want in ("fetched", "already fetched"):
        r = subprocess.run([sys.executable, "-m", "saelab", "fetch", f"hf://{REPO}/{HOOK}", "--out", str(out),
                            "--quiet"], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{want} into {out}:\n  {out}: relu, d_in 128, 256 latents, hook {HOOK}, "
                                   "model tiny (weights hard-linked to the hub cache)\n"), r.stdout
        assert f"saelab analyze --sae {out}" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "source.json"]
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the cache
    src = json.loads((out / "source.json").read_text())
    assert (src["repo_id"], src["subfolder"], src["commit"]) == (REPO, HOOK, COMMIT)
    # the weights are the cache's blob itself (no second copy on disk); cfg.json is a copy an editor may change
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / HOOK
    same = lambda f: os.stat(out / f).st_ino == os.stat(snap / f).st_ino  # noqa: E731 (stat follows the symlink)
    assert same("sae_weights.safetensors") and not same("cfg.json") and src["weights"] == "hard-linked to the hub cache"
    # a local folder's files are copied (their owner may re-save them in place)
    from saelab.hub import fetch_sae

    again, _, _ = fetch_sae(str(out), tmp_path / "copy", progress=False)
    assert os.stat(again / "sae_weights.safetensors").st_ino != os.stat(out / "sae_weights.safetensors").st_ino
    assert "weights" not in json.loads((again / "source.json").read_text())
    sae = SAE.load(out)
    assert sae.cfg.hook_name == HOOK and sae.arch == "relu"
    for name, t in w.items():
        torch.testing.assert_close(getattr(sae, name).detach(), t, rtol=0, atol=0)
    assert [p.name for p in out.parent.iterdir()] == ["fetched"]  # no temporary folder left
    # the fetched folder is an SAE folder like any other: analyze it on a store of its hook (the printed next step)
    from saelab.analysis.features.db import FeatureDB
    from saelab.cli import main

    _, stores = small_run
    assert main(["analyze", "--sae", str(out), "--activations", str(stores[HOOK].parent), "--quiet"]) == 0
    with FeatureDB(out) as db:
        assert db.d_sae == 256 and db.hook == HOOK and db.n_rows > 0


def test_fetch_reads_an_old_saelens_config_and_defaults_out(hub_cache, tmp_path, monkeypatch):
    from saelab.hub import default_out, fetch_sae

    _saelens_sae(hub_cache, tmp_path, sub="saes/layer0", old=True)
    monkeypatch.chdir(tmp_path)
    out, sae, fetched = fetch_sae(f"{REPO}/saes/layer0", progress=False)
    assert fetched and out == default_out(f"{REPO}/saes/layer0") == tmp_path.joinpath("runs/tiny-saes/saes/layer0").relative_to(tmp_path)
    assert sae.cfg.hook_name == HOOK and sae.arch == "relu" and sae.d_sae == 256


@pytest.mark.parametrize("spec,setup,needle", [
    ("someone", None, "is not a hub SAE: pass ORG/REPO/SUBFOLDER"),
    (f"{REPO}/blocks.9.hook_resid_post", "good", "not in the local Hugging Face cache"),
    (f"{REPO}/{HOOK}", "gated", "lacks r_mag, b_mag: not a gated SAE weights file"),  # gated cfg, standard weights
    ("bad id!!/x/y", None, "is not a hub repo id"),
    (f"{REPO}/{HOOK}", "taken", "already exists and holds something else"),
    ("a/b/../../../etc", None, "its path has a '..' segment"),  # was huggingface_hub's ValueError traceback
    (f"{REPO}/./{HOOK}", "good", "its path has a '.' segment"),
    (f"someone//tiny-saes/{HOOK}", "good", "its path has an empty segment"),
    (f"{REPO}/{HOOK}", "nan", "the SAE's weights hold NaN or inf"),  # was fetched without complaint
])
def test_fetch_errors_are_one_line_and_leave_nothing(hub_cache, tmp_path, capsys, spec, setup, needle):
    from saelab.cli import main

    if setup in ("good", "taken"):
        _saelens_sae(hub_cache, tmp_path)
    elif setup == "nan":
        _saelens_sae(hub_cache, tmp_path, nan=True)
    elif setup == "gated":
        _saelens_sae(hub_cache, tmp_path, arch="gated")
    out = tmp_path / "runs" / "x"
    if setup == "taken":
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["fetch", spec, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    if setup == "taken":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not (tmp_path / "runs").exists()  # neither --out, nor its parents, nor a temporary folder


def test_fetch_of_a_local_folder_with_nan_weights_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """A local SAE folder whose weights hold NaN is refused as eval refuses it (it was copied without complaint)."""
    from safetensors.torch import load_file

    from saelab.cli import main

    src = SAE.create("topk", d_in=8, d_sae=16, k=2, hook_name=HOOK, model_name="tiny").save(tmp_path / "src")
    w = load_file(src / "sae_weights.safetensors")
    w["b_dec"][0] = float("inf")
    save_file(w, src / "sae_weights.safetensors")
    out = tmp_path / "runs" / "x"
    assert main(["fetch", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the SAE's weights hold NaN or inf" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_transformer_lens_aliases_map_to_hub_ids():
    """SAELens configs record TransformerLens aliases ("gpt2-small"); TransformerLens 4's bridge loads HF ids."""
    from saelab.models import hub_name, tl_major

    if tl_major() < 4:
        assert hub_name("gpt2-small") in ("gpt2-small", "gpt2")  # HookedTransformer resolves aliases itself
        return
    assert hub_name("gpt2-small") == "gpt2"
    assert hub_name("pythia-70m") == "EleutherAI/pythia-70m"
    assert hub_name("someone/not-an-alias") == "someone/not-an-alias"


HOOK1 = "blocks.1.hook_resid_post"


def test_several_saes_make_a_group_that_circuits_read(hub_cache, tmp_path, capsys, tiny):
    from saelab.analysis.circuits import find_circuit, load_group
    from saelab.analysis.tasks import make_task
    from saelab.cli import main
    from saelab.layout import read_group

    _saelens_sae(hub_cache, tmp_path)
    _saelens_sae(hub_cache, tmp_path, sub="l1", hook=HOOK1)
    out = tmp_path / "runs" / "grp"
    args = ["fetch", f"{REPO}/{HOOK}", f"{REPO}/l1", "--out", str(out), "--quiet"]
    for want in ("fetched", "already fetched"):
        capsys.readouterr()
        assert main(args) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"{want} into {out}:") and f"--hook {HOOK} --hook {HOOK1}" in text, text
    model, hooks = read_group(out)
    assert model == "tiny" and hooks == {HOOK: out / HOOK, HOOK1: out / HOOK1}
    assert sorted(p.name for p in out.iterdir()) == sorted([HOOK, HOOK1, "group.json"])  # no hidden leftovers
    group = load_group(out)  # what saelab circuit --saes reads
    assert group.model == "tiny" and group.hooks == [HOOK, HOOK1] and group.n_latents == 512
    # SAELens ReLU SAEs (random here) splice in exactly, error terms included: keeping every node is the full model
    c = find_circuit(tiny, out, make_task("induction", tiny, n=8), node_threshold=0.0, edges=False, node_sweep=(),
                     progress=False)
    assert c["n_latents_total"] == 512 and abs(c["faithfulness"]["nodes"] - 1.0) < 1e-3, c["faithfulness"]


@pytest.mark.parametrize("case,needle", [
    ("same hook", "both read blocks.0.hook_resid_post"),
    ("two models", "different models (other, tiny)"),
    ("one missing", "not in the local Hugging Face cache"),
    ("no out", "several SAEs make a group: pass --out"),
    ("twice", "is given twice"),
])
def test_group_errors_are_one_line_and_leave_nothing(hub_cache, tmp_path, capsys, case, needle):
    from saelab.cli import main

    _saelens_sae(hub_cache, tmp_path)
    second = {"same hook": "again", "two models": "other", "one missing": "nowhere", "no out": "other",
              "twice": HOOK}[case]
    if case in ("same hook", "two models", "no out"):
        _saelens_sae(hub_cache, tmp_path, sub=second, hook=HOOK if case == "same hook" else HOOK1,
                     model="other" if case == "two models" else "tiny")
    out = tmp_path / "runs" / "grp"
    capsys.readouterr()
    assert main(["fetch", f"{REPO}/{HOOK}", f"{REPO}/{second}", *([] if case == "no out" else ["--out", str(out)]),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_list_names_the_sae_folders_of_a_repo(hub_cache, tmp_path, capsys, monkeypatch):
    """--list: from the hub (here a stand-in for list_repo_files) or, offline, from the cached snapshot;
    only folders with both files count; a missing subfolder's error names the cached ones."""
    import huggingface_hub
    import huggingface_hub.constants as c

    from saelab.cli import main

    _saelens_sae(hub_cache, tmp_path)
    _saelens_sae(hub_cache, tmp_path, sub="l1", hook=HOOK1)
    _put(hub_cache, REPO, "notes/cfg.json", b"{}")  # a cfg.json without weights is no SAE folder
    capsys.readouterr()
    assert main(["fetch", "--list", REPO]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{REPO}: 2 SAE folders in the local cache (offline: only what was downloaded before)",
        f"  {REPO}/{HOOK}", f"  {REPO}/l1"]
    assert main(["fetch", f"{REPO}/missing", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"connect and fetch again; cached: {HOOK}, l1")

    online = ["README.md", "a/cfg.json", "a/sae_weights.safetensors", "a/sparsity.safetensors", "b/cfg.json",
              "deep/x/cfg.json", "deep/x/sae_weights.safetensors"]
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: online)
    assert main(["fetch", "--list", "other/repo", "hf://other/repo/deep"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "other/repo: 2 SAE folders", "  other/repo/a", "  other/repo/deep/x",
        "hf://other/repo/deep: 1 SAE folder", "  other/repo/deep/x"]


def test_list_offline_of_an_uncached_repo_is_one_line(hub_cache, capsys):
    from saelab.cli import main

    assert main(["fetch", "--list", "nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nobody/nothing is not in the local Hugging Face cache" in err and len(err.splitlines()) == 1, err


def test_sae_load_reads_hf_specs_from_the_cache(hub_cache, tmp_path):
    """SAE.load("hf://ORG/REPO/SUBFOLDER") loads straight from the hub cache (as SAELens's from_pretrained)."""
    w = _saelens_sae(hub_cache, tmp_path)
    sae = SAE.load(f"hf://{REPO}/{HOOK}")
    assert sae.cfg.hook_name == HOOK and sae.d_sae == 256
    torch.testing.assert_close(sae.W_enc.detach(), w["W_enc"], rtol=0, atol=0)
    with pytest.raises(SaelabError, match="is not in the local Hugging Face cache"):
        SAE.load(f"hf://{REPO}/blocks.5.hook_resid_post")


@pytest.mark.parametrize("argv", [["analyze", "--sae"], ["eval", "--sae"], ["circuit", "--task", "induction", "--saes"],
                                  ["app", "--sae"]])
def test_commands_that_write_next_to_the_sae_name_fetch_for_a_hub_spec(hub_cache, tmp_path, capsys, monkeypatch,
                                                                       argv):
    from saelab.cli import main

    _saelens_sae(hub_cache, tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = f"hf://{REPO}/{HOOK}"
    capsys.readouterr()
    assert main([*argv, spec, "--quiet"] if argv[0] != "app" else [*argv, spec]) == 2
    err = capsys.readouterr().err.strip()
    assert f"saelab fetch {spec} --out runs/NAME" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf:").exists()  # no stray local folder named after the spec


def test_sae_load_takes_a_hub_spec_as_a_path_too(hub_cache, tmp_path):
    """pathlib folds hf://… into hf:/…; SAE.load reads it as the same hub SAE (not as a missing local folder)."""
    import pathlib

    _saelens_sae(hub_cache, tmp_path)
    assert SAE.load(pathlib.Path(f"hf://{REPO}/{HOOK}")).cfg.hook_name == HOOK


@pytest.mark.parametrize("old", [False, True])
def test_model_and_hook_overrides_rewrite_a_saelens_config(hub_cache, tmp_path, old):
    """--model / --hook on a SAELens folder (copied as it is otherwise): cfg.json records them, whichever fields its
    SAELens version used (metadata block, flat fields, an old hook_point)."""
    from saelab.hub import fetch_sae

    w = _saelens_sae(hub_cache, tmp_path, old=old)
    out, sae, _ = fetch_sae(f"{REPO}/{HOOK}", tmp_path / "o", progress=False, model="gpt2", hook=HOOK1)
    assert (sae.cfg.model_name, sae.cfg.hook_name) == ("gpt2", HOOK1)
    back = SAE.load(out)
    assert (back.cfg.model_name, back.cfg.hook_name) == ("gpt2", HOOK1)
    torch.testing.assert_close(back.W_enc.detach(), w["W_enc"], rtol=0, atol=0)  # the weights untouched


def test_steer_reads_a_hub_sae_without_fetching_it(hub_cache, tmp_path, capsys, monkeypatch, tiny):
    """`saelab steer --sae hf://…` steers with an SAE straight from the hub cache (nothing is written next to it)
    and the model its cfg.json names; --hook with a hub spec is a one-line error."""
    import json

    from saelab.cli import main

    _saelens_sae(hub_cache, tmp_path)
    monkeypatch.chdir(tmp_path)
    spec, out = f"hf://{REPO}/{HOOK}", tmp_path / "steer.json"
    args = ["steer", "--sae", spec, "--prompt", "Once upon a time", "--steer", "3:add:20", "--tokens", "4", "--quiet"]
    assert main([*args, "--json", str(out)]) == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    assert got["sae"] == spec and got["hook"] == HOOK and got["model"] == "tiny" and got["metrics"]["kl"] > 0
    assert not (tmp_path / "hf:").exists()
    capsys.readouterr()
    assert main([*args, "--hook", HOOK]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drop --hook" in err, err
