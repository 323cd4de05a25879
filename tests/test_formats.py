"""Gemma Scope's and EleutherAI sparsify's SAE layouts (saelab.formats), fetched offline from a hand-built hub
cache and checked against plain re-implementations of each release's own encode/decode on fresh random inputs."""

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from saelab.errors import SaelabError
from saelab.sae.base import SAE
from tests.test_hub import COMMIT, _put

GEMMA = "google/gemma-scope-2b-pt-res"
GEMMA_SUB = "layer_3/width_16k/average_l0_7"
SPARSIFY = "EleutherAI/sae-tiny-8x"


def _gemma(cache, repo=GEMMA, sub=GEMMA_SUB, d_in=24, d_sae=96, seed=0, drop=None):
    """A Gemma Scope params.npz in the cache; returns its arrays."""
    p = _gemma_arrays(d_in, d_sae, seed, drop)
    buf = io.BytesIO()
    np.savez(buf, **p)
    _put(cache, repo, f"{sub}/params.npz", buf.getvalue())
    return p


def _gemma_arrays(d_in, d_sae, seed=0, drop=None):
    """Random Gemma Scope arrays (thresholds that cut a fair share of the codes); ``drop``: one left out."""
    rng = np.random.default_rng(seed)
    p = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32) / 4,
         "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
         "b_enc": rng.normal(size=d_sae).astype(np.float32) / 4,
         "b_dec": rng.normal(size=d_in).astype(np.float32),
         "threshold": rng.uniform(0.2, 1.0, size=d_sae).astype(np.float32)}
    if drop:
        p.pop(drop)
    return p


def _gemma_reference(p, x):
    """Gemma Scope's JumpReLU as its release describes it: f = ReLU(z)·[z > θ], z = x W_enc + b_enc."""
    z = x @ p["W_enc"] + p["b_enc"]
    f = np.maximum(z, 0) * (z > p["threshold"])
    return f, f @ p["W_dec"] + p["b_dec"]


def _sparsify(cache, sub="layers.1", d_in=24, d_sae=192, k=8, cfg=None, run_cfg=True, extra=None):
    """A sparsify hookpoint folder (cfg.json + sae.safetensors) and the run's config.json; returns the weights."""
    torch.manual_seed(1)
    w = {"encoder.weight": torch.randn(d_sae, d_in) / 4, "encoder.bias": torch.randn(d_sae) / 4,
         "W_dec": torch.randn(d_sae, d_in), "b_dec": torch.randn(d_in), **(extra or {})}
    _put(cache, SPARSIFY, f"{sub}/sae.safetensors", save(w))
    c = {"expansion_factor": 8, "normalize_decoder": True, "num_latents": 0, "k": k, "multi_topk": False,
         "skip_connection": False, "d_in": d_in, **(cfg or {})}
    _put(cache, SPARSIFY, f"{sub}/cfg.json", json.dumps(c).encode())
    if run_cfg:
        _put(cache, SPARSIFY, "config.json", json.dumps({"model": "EleutherAI/pythia-70m", "k": k}).encode())
    return w


def _sparsify_reference(w, x, k):
    """sparsify's TopK: f = TopK(ReLU((x − b_dec) encoder.weightᵀ + encoder.bias)), x̂ = f W_dec + b_dec."""
    z = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    v, i = z.topk(k, dim=-1)
    f = torch.zeros_like(z).scatter(-1, i, v)
    return f, f @ w["W_dec"] + w["b_dec"]


def test_gemma_scope_is_fetched_into_a_jumprelu_folder_that_matches_its_encode(hub_cache, tmp_path, capsys):
    from saelab.cli import main

    p = _gemma(hub_cache)
    out = tmp_path / "runs" / "gs"
    assert main(["fetch", f"{GEMMA}/{GEMMA_SUB}", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"{out}: jumprelu, d_in 24, 96 latents, hook blocks.3.hook_resid_post, model google/gemma-2-2b" in text
    assert "saelab harvest --model google/gemma-2-2b --hook blocks.3.hook_resid_post" in text, text
    assert sorted(x.name for x in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "source.json"]
    src = json.loads((out / "source.json").read_text())
    assert (src["repo_id"], src["subfolder"], src["commit"], src["format"]) == (GEMMA, GEMMA_SUB, COMMIT, "gemma-scope")
    cfg = json.loads((out / "cfg.json").read_text())  # what SAELens reads: b_dec is not subtracted from the input
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False and cfg["d_sae"] == 96
    x = np.random.default_rng(7).normal(size=(64, 24)).astype(np.float32) * 2
    f_ref, x_hat_ref = _gemma_reference(p, x)
    assert 0 < (f_ref > 0).mean() < 0.9  # the thresholds cut: a non-trivial check
    for sae in (SAE.load(out), SAE.load(f"hf://{GEMMA}/{GEMMA_SUB}")):
        assert sae.arch == "jumprelu" and sae.apply_b_dec_to_input is False and sae.cfg.k == 7
        with torch.no_grad():
            f = sae.encode(torch.from_numpy(x)).numpy()
            x_hat = sae(torch.from_numpy(x)).numpy()
        assert ((f > 0) == (f_ref > 0)).all()
        np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
        assert np.abs(x_hat - x_hat_ref).max() <= 1e-5 * np.abs(x_hat_ref).max()


@pytest.mark.parametrize("repo,sub,model,hook", [
    ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71", "google/gemma-2-2b", "blocks.20.hook_resid_post"),
    ("google/gemma-scope-9b-it-res", "layer_9/width_131k/average_l0_121", "google/gemma-2-9b-it",
     "blocks.9.hook_resid_post"),
    ("google/gemma-scope-2b-pt-mlp", "layer_0/width_65k/average_l0_8", "google/gemma-2-2b", "blocks.0.hook_mlp_out"),
    ("google/gemma-scope-27b-pt-att", "layer_12/width_16k/average_l0_50", "google/gemma-2-27b",
     "blocks.12.attn.hook_z"),
])
def test_gemma_scope_model_and_hook_come_from_the_repo_and_folder(repo, sub, model, hook):
    from saelab.formats import gemma_scope_target

    assert gemma_scope_target(repo, sub) == (model, hook)


def test_sparsify_is_fetched_into_a_topk_folder_that_matches_its_encode(hub_cache, tmp_path):
    from saelab.hub import fetch_sae

    w = _sparsify(hub_cache)
    out, sae, fetched = fetch_sae(f"{SPARSIFY}/layers.1", tmp_path / "sp", progress=False)
    assert fetched and sae.arch == "topk" and sae.cfg.k == 8 and sae.apply_b_dec_to_input is True
    assert (sae.cfg.hook_name, sae.cfg.model_name) == ("blocks.1.hook_resid_post", "EleutherAI/pythia-70m")
    assert json.loads((out / "source.json").read_text())["format"] == "sparsify"
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3)) * 2
    f_ref, x_hat_ref = _sparsify_reference(w, x, 8)
    for s in (SAE.load(out), SAE.load(f"hf://{SPARSIFY}/layers.1")):
        with torch.no_grad():
            f, x_hat = s.encode(x), s(x)
        assert torch.equal(f != 0, f_ref != 0)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
        assert (x_hat - x_hat_ref).abs().max() <= 1e-5 * x_hat_ref.abs().max()


def test_sparsify_without_a_run_config_names_no_model_and_mlp_hookpoints_map(hub_cache, tmp_path):
    from saelab.hub import fetch_sae

    _sparsify(hub_cache, sub="layers.2.mlp", run_cfg=False)
    _, sae, _ = fetch_sae(f"{SPARSIFY}/layers.2.mlp", tmp_path / "sp", progress=False)
    assert (sae.cfg.hook_name, sae.cfg.model_name) == ("blocks.2.hook_mlp_out", "")


def test_list_and_groups_take_the_other_layouts(hub_cache, tmp_path, capsys):
    from saelab.cli import main
    from saelab.layout import read_group

    _gemma(hub_cache)
    _gemma(hub_cache, sub="layer_5/width_16k/average_l0_9", seed=1)
    _put(hub_cache, GEMMA, "README.md", b"not an SAE")
    capsys.readouterr()
    assert main(["fetch", "--list", GEMMA]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"  {GEMMA}/{GEMMA_SUB}",
                                                        f"  {GEMMA}/layer_5/width_16k/average_l0_9"]
    out = tmp_path / "grp"
    assert main(["fetch", f"{GEMMA}/{GEMMA_SUB}", f"{GEMMA}/layer_5/width_16k/average_l0_9", "--out", str(out),
                 "--quiet"]) == 0
    model, hooks = read_group(out)
    assert model == "google/gemma-2-2b" and sorted(hooks) == ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]


@pytest.mark.parametrize("case,needle", [
    ("transcoders", "holds transcoders"),
    ("unknown repo", "is not a Gemma Scope repo saelab knows"),
    ("no layer", "no layer_L folder in the path"),
    ("npz lacks threshold", "lacks threshold: not a Gemma Scope SAE file"),
    ("sparsify transcoder", "is a sparsify transcoder"),
    ("sparsify hookpoint", "sparsify hookpoint 'layers.1.self_attn' maps to no TransformerLens hook"),
    ("sparsify skip", "W_skip is not supported"),
    ("sparsify groupmax", "sparsify activation 'groupmax' is not supported"),
    ("sparsify shapes", "the files do not belong together"),
    ("nothing there", "has no SAE in layer_9 (cfg.json + sae_weights.safetensors for SAELens and saelab, params.npz"),
    ("weights missing", "has cfg.json but no weights (sae_weights.safetensors or sae.safetensors) in the local cache"),
])
def test_other_layout_errors_are_one_line_and_leave_nothing(hub_cache, tmp_path, capsys, monkeypatch, case, needle):
    import huggingface_hub

    from saelab.cli import main

    spec = {
        "transcoders": ("google/gemma-scope-2b-pt-transcoders", GEMMA_SUB),
        "unknown repo": ("someone/my-saes", "layer_1"),
        "no layer": (GEMMA, "embedding/width_4k/average_l0_6"),
        "npz lacks threshold": (GEMMA, GEMMA_SUB),
        "nothing there": (GEMMA, "layer_9"),
        "weights missing": ("someone/half", "l0"),
    }.get(case, (SPARSIFY, "layers.1.self_attn" if case == "sparsify hookpoint" else "layers.1"))
    if case == "weights missing":
        _put(hub_cache, "someone/half", "l0/cfg.json", b"{}")
    elif case == "npz lacks threshold":
        _gemma(hub_cache, drop="threshold")
    elif spec[0] != SPARSIFY:
        _gemma(hub_cache, repo=spec[0], sub=spec[1])
    else:
        _sparsify(hub_cache, sub=spec[1], cfg={"transcode": case == "sparsify transcoder",
                                               "activation": "groupmax" if case == "sparsify groupmax" else "topk"},
                  extra={"sparsify skip": {"W_skip": torch.zeros(24, 24)},
                         "sparsify shapes": {"W_dec": torch.zeros(190, 24)}}.get(case))  # shapes: widths disagree
    if case == "nothing there":  # the hint lists what the repo has, from the hub's file list
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: [f"{GEMMA_SUB}/params.npz"])
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", _missing)
    out = tmp_path / "runs" / "x"
    capsys.readouterr()
    assert main(["fetch", f"{spec[0]}/{spec[1]}", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    if case == "nothing there":
        assert err.endswith(f"; it has: {GEMMA_SUB}"), err
    assert not (tmp_path / "runs").exists()


def _missing(repo, filename, **kw):
    """A stand-in for the hub's download of a file the repo does not have."""
    from saelab.hub.download import _errors

    raise _errors().EntryNotFoundError(f"404 {filename}")


def test_sparsify_reference_load_rejects_a_bad_config(tmp_path):
    """The converter on its own: a cfg.json that is not an object is a one-line error, not an AttributeError."""
    from saelab.formats import sparsify_sae

    (tmp_path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SaelabError, match="is not a sparsify config"):
        sparsify_sae(tmp_path / "cfg.json", tmp_path / "sae.safetensors", "", "layers.0")


def test_local_folders_in_other_layouts_are_fetched_too(tmp_path, capsys, monkeypatch):
    """A sparsify run trained here, or a Gemma Scope file downloaded by hand: `saelab fetch FOLDER --out` converts
    it (model and hook from the run's config.json / the path); SAE.load of the raw folder names that command."""
    from saelab.cli import main

    src = tmp_path / "sparsify-run"
    (src / "layers.0").mkdir(parents=True)
    torch.manual_seed(2)
    w = {"encoder.weight": torch.randn(96, 24), "encoder.bias": torch.randn(96), "W_dec": torch.randn(96, 24),
         "b_dec": torch.randn(24)}
    (src / "layers.0" / "sae.safetensors").write_bytes(save(w))
    (src / "layers.0" / "cfg.json").write_text(json.dumps({"d_in": 24, "num_latents": 96, "k": 4}))
    (src / "config.json").write_text(json.dumps({"model": "tiny"}))
    with pytest.raises(SaelabError, match=r"holds an SAE in sparsify's layout, not saelab's: convert it once with "
                                          r"`saelab fetch .*layers.0 --out runs/NAME`"):
        SAE.load(src / "layers.0")
    capsys.readouterr()
    assert main(["fetch", "--list", str(src)]) == 0  # the SAE folders under a local folder
    assert capsys.readouterr().out.splitlines() == [f"{src}: 1 SAE folder", f"  {(src / 'layers.0').resolve()}"]
    out = tmp_path / "runs" / "mine"
    for want in ("fetched", "already fetched"):
        capsys.readouterr()
        assert main(["fetch", str(src / "layers.0"), "--out", str(out), "--quiet"]) == 0
        assert capsys.readouterr().out.startswith(f"{want} into {out}:\n  {out}: topk, d_in 24, 96 latents, "
                                                  "hook blocks.0.hook_resid_post, model tiny")
    assert json.loads((out / "source.json").read_text())["path"] == str((src / "layers.0").resolve())
    x = torch.randn(16, 24)
    torch.testing.assert_close(SAE.load(out)(x), _sparsify_reference(w, x, 4)[1], rtol=1e-5, atol=1e-4)

    gs = tmp_path / "models--google--gemma-scope-9b-pt-mlp" / "snapshots" / COMMIT / "layer_7" / "width_16k" / "average_l0_11"
    gs.mkdir(parents=True)
    np.savez(gs / "params.npz", **_gemma_arrays(16, 32))
    assert main(["fetch", str(gs), "--out", str(tmp_path / "runs" / "gs"), "--quiet"]) == 0
    sae = SAE.load(tmp_path / "runs" / "gs")
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.arch) == ("google/gemma-2-9b", "blocks.7.hook_mlp_out", "jumprelu")

    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fetch", str(empty), "--out", str(tmp_path / "runs" / "e")]) == 2
    assert "holds no SAE saelab reads" in capsys.readouterr().err
    assert main(["fetch", str(gs), "--revision", "v1", "--out", str(tmp_path / "runs" / "r")]) == 2
    assert "--revision applies to hub SAEs" in capsys.readouterr().err
    for path, needle in ((gs / "params.npz", "is a file: pass the folder that holds the SAE"),
                         (tmp_path / "nowhere" / "x", "no such folder (a hub SAE is ORG/REPO/SUBFOLDER")):
        assert main(["fetch", str(path), "--out", str(tmp_path / "runs" / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    # --revision with a local folder is refused even when --out already holds it (it used to say "already fetched")
    assert main(["fetch", str(src / "layers.0"), "--out", str(out), "--revision", "v1"]) == 2
    assert "--revision applies to hub SAEs" in capsys.readouterr().err
    # a mistyped relative local path reads as ORG/REPO/SUBFOLDER: the hub's error also names the local folder
    monkeypatch.chdir(tmp_path)
    assert main(["fetch", "sparsify-run/layers.9", "--out", str(tmp_path / "runs" / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert ("or, if sparsify-run/layers.9 was meant as a local folder: there is no such folder, sparsify-run holds "
            "layers.0") in err and len(err.splitlines()) == 1, err
    assert sorted(x.name for x in (tmp_path / "runs").iterdir()) == ["gs", "mine"]  # the failures left nothing


def test_model_and_hook_overrides_are_recorded_and_part_of_what_was_fetched(hub_cache, tmp_path, capsys):
    """--model / --hook: an SAE that names no model (sparsify without its run config) or the wrong hook gets the
    ones given, in every block of cfg.json SAELens and saelab read; a rerun with other ones is refused."""
    from saelab.cli import main
    from saelab.layout import read_group

    _sparsify(hub_cache, sub="layers.1", run_cfg=False)
    _sparsify(hub_cache, sub="layers.2", run_cfg=False)
    out = tmp_path / "runs" / "sp"
    args = ["fetch", f"{SPARSIFY}/layers.1", "--out", str(out), "--model", "EleutherAI/pythia-70m", "--hook",
            "blocks.1.hook_resid_pre", "--quiet"]
    for want in ("fetched", "already fetched"):
        capsys.readouterr()
        assert main(args) == 0
        assert capsys.readouterr().out.startswith(f"{want} into {out}:\n  {out}: topk, d_in 24, 192 latents, hook "
                                                  "blocks.1.hook_resid_pre, model EleutherAI/pythia-70m")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["model_name"], cfg["hook_name"], cfg["hook_layer"]) == ("EleutherAI/pythia-70m",
                                                                        "blocks.1.hook_resid_pre", 1)
    assert cfg["metadata"]["hook_name"] == cfg["saelab"]["hook_name"] == "blocks.1.hook_resid_pre"
    assert json.loads((out / "source.json").read_text())["target"] == {"model": "EleutherAI/pythia-70m",
                                                                       "hook": "blocks.1.hook_resid_pre"}
    sae = SAE.load(out)
    assert (sae.cfg.model_name, sae.cfg.hook_name) == ("EleutherAI/pythia-70m", "blocks.1.hook_resid_pre")
    assert main([*args[:-3], "--quiet"]) == 2  # the same SAE without the --hook: not what the folder holds
    assert "already exists and holds something else" in capsys.readouterr().err
    # a group of SAEs that name no model: --model gives the group one
    grp = tmp_path / "runs" / "grp"
    assert main(["fetch", f"{SPARSIFY}/layers.1", f"{SPARSIFY}/layers.2", "--out", str(grp), "--model", "tiny",
                 "--quiet"]) == 0
    assert read_group(grp)[0] == "tiny"
    for bad, needle in ((["--hook", "blocks.1.hook_resid_post"], "--hook names one SAE's hook"),
                        (["--hook", "resid"], "is not a TransformerLens hook name")):
        capsys.readouterr()
        specs = [f"{SPARSIFY}/layers.1"] + ([f"{SPARSIFY}/layers.2"] if "one SAE" in needle else [])
        assert main(["fetch", *specs, "--out", str(tmp_path / "runs" / "bad"), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "bad").exists()


def test_overrides_let_the_converters_take_what_they_cannot_tell(hub_cache, tmp_path, capsys):
    """A params.npz whose path names no Gemma Scope repo, a sparsify hookpoint with no TransformerLens hook saelab
    knows: the one-line errors name --model / --hook, and with them the SAE is fetched."""
    from saelab.cli import main

    bare = tmp_path / "downloads" / "my-sae"
    bare.mkdir(parents=True)
    np.savez(bare / "params.npz", **_gemma_arrays(16, 32))
    _sparsify(hub_cache, sub="layers.1.self_attn")
    for spec, needle, extra, hook in (
            (str(bare), "pass them, --model and --hook", ["--model", "google/gemma-2-2b", "--hook",
                                                         "blocks.4.hook_resid_post"], "blocks.4.hook_resid_post"),
            (f"{SPARSIFY}/layers.1.self_attn", "): pass --hook", ["--hook", "blocks.1.hook_attn_out"],
             "blocks.1.hook_attn_out")):
        out = tmp_path / "runs" / hook
        capsys.readouterr()
        assert main(["fetch", spec, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert main(["fetch", spec, "--out", str(out), *extra, "--quiet"]) == 0
        assert SAE.load(out).cfg.hook_name == hook


# ----------------------------------------------------------------------------------------- dictionary_learning
def _dl_state(cls, d_in=12, d_sae=40, k=4, seed=0):
    """A state dict as dictionary_learning's class ``cls`` holds it (its keys and nn.Linear's [out, in] shapes)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=0.3):
        return torch.randn(*s, generator=g) * scale

    if cls == "AutoEncoder":
        return {"bias": r(d_in), "encoder.weight": r(d_sae, d_in), "encoder.bias": r(d_sae, scale=0.1),
                "decoder.weight": r(d_in, d_sae)}
    if cls == "AutoEncoderNew":
        return {"encoder.weight": r(d_sae, d_in), "encoder.bias": r(d_sae, scale=0.1),
                "decoder.weight": r(d_in, d_sae), "decoder.bias": r(d_in)}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"encoder.weight": r(d_sae, d_in), "encoder.bias": r(d_sae, scale=0.1), "decoder.weight": r(d_in, d_sae),
                "b_dec": r(d_in), "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(0.35)}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": r(d_in, d_sae), "b_enc": r(d_sae, scale=0.1), "W_dec": r(d_sae, d_in), "b_dec": r(d_in),
                "threshold": torch.rand(d_sae, generator=g) * 0.5}
    return {"decoder_bias": r(d_in), "encoder.weight": r(d_sae, d_in), "r_mag": r(d_sae), "gate_bias": r(d_sae),
            "mag_bias": r(d_sae), "decoder.weight": r(d_in, d_sae)}


def _dl_reference(cls, w, x, k=4):
    """x̂ of x by dictionary_learning's formulas for ``cls`` (written out here from its classes' definitions)."""
    relu = torch.relu
    if cls == "AutoEncoder":
        f = relu((x - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"])
        return f @ w["decoder.weight"].T + w["bias"]
    if cls == "AutoEncoderNew":
        return relu(x @ w["encoder.weight"].T + w["encoder.bias"]) @ w["decoder.weight"].T + w["decoder.bias"]
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
        if cls == "BatchTopKSAE":  # inference: the threshold
            f = post * (post > w["threshold"])
        else:
            v, i = post.topk(k, dim=-1)
            f = torch.zeros_like(post).scatter(-1, i, v)
        return f @ w["decoder.weight"].T + w["b_dec"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ w["W_enc"] + w["b_enc"]
        f = relu(pre * (pre > w["threshold"])) * w["W_dec"].norm(dim=1)
        return (f / w["W_dec"].norm(dim=1)) @ w["W_dec"] + w["b_dec"]
    x_enc = (x - w["decoder_bias"]) @ w["encoder.weight"].T
    norms = w["decoder.weight"].norm(dim=0)
    f = (x_enc + w["gate_bias"] > 0).float() * relu(w["r_mag"].exp() * x_enc + w["mag_bias"]) * norms
    return (f / norms) @ w["decoder.weight"].T + w["decoder_bias"]


DL_CLASSES = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
              "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}


@pytest.mark.parametrize("cls", list(DL_CLASSES))
def test_dictionary_learning_ae_pt_is_fetched_into_a_folder_that_reconstructs_as_it_does(cls, tmp_path, capsys):
    """An ``ae.pt`` with the trainer's config.json beside it, as SAEBench publishes them: ``saelab fetch FOLDER``
    writes an SAE folder of the matching architecture whose reconstruction of fresh random inputs is
    dictionary_learning's (1e-5), with the model and hook the config names; SAE.load of the raw folder points at
    fetch in one line."""
    from saelab.cli import main
    from saelab.errors import SaelabError

    src = tmp_path / "saebench" / "resid_post_layer_3" / "trainer_0"
    src.mkdir(parents=True)
    w = _dl_state(cls)
    torch.save(w, src / "ae.pt")
    (src / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "lm_name": "EleutherAI/pythia-70m",
                                                             "layer": 3, "k": 4, "activation_dim": 12,
                                                             "dict_size": 40}}))
    with pytest.raises(SaelabError, match=r"dictionary-learning's layout, not saelab's: convert it once with"):
        SAE.load(src)
    out = tmp_path / "runs" / "dl"
    assert main(["fetch", str(src), "--out", str(out), "--quiet"]) == 0
    sae = SAE.load(out)
    assert sae.arch == DL_CLASSES[cls] and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.model_name == "EleutherAI/pythia-70m" and (sae.d_in, sae.d_sae) == (12, 40)
    assert json.loads((out / "source.json").read_text())["format"] == "dictionary-learning"
    x = torch.randn(64, 12)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), _dl_reference(cls, w, x), rtol=1e-5, atol=1e-5)
    capsys.readouterr()


def test_dictionary_learning_without_a_config_and_bad_files(tmp_path, capsys):
    """Without config.json the keys tell the class (a TopK), the hook comes from the path or stays to be passed;
    a pickled module (not a state dict) and a file of other keys are one-line errors that write nothing."""
    from saelab.cli import main

    src = tmp_path / "mlp_out_layer_1"
    src.mkdir()
    w = _dl_state("AutoEncoderTopK")
    torch.save(w, src / "ae.pt")
    out = tmp_path / "out"
    assert main(["fetch", str(src), "--out", str(out), "--quiet"]) == 0
    sae = SAE.load(out)
    assert sae.arch == "topk" and sae.cfg.k == 4 and sae.cfg.hook_name == "blocks.1.hook_mlp_out"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(torch.nn.Linear(3, 4), bad / "ae.pt")  # a whole module: a pickle of a class, not of tensors
    capsys.readouterr()
    assert main(["fetch", str(bad), "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds more than tensors" in err and len(err.splitlines()) == 1, err
    torch.save({"weird": torch.zeros(3)}, bad / "ae.pt")
    assert main(["fetch", str(bad), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks encoder.weight" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
