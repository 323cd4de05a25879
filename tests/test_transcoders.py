"""Transcoders and skip transcoders: the loss against a plain formula, the fused path against the dense one, files,
scale folding, and training on planted paired data from the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from saelab.config import TRANSCODER_ACTIVATIONS
from saelab.errors import SaelabError
from saelab.sae import SAE
from saelab.sae.transcoder import Transcoder

TRANSCODERS = ["transcoder", "skip-transcoder"]  # one per pair (the CLT: tests/test_clt.py)
CASES = list(itertools.product(TRANSCODERS, TRANSCODER_ACTIVATIONS))


def _make(arch, act_fn, d_in=24, d_out=16, width=96, k=6, seed=0):
    torch.manual_seed(seed)
    t = SAE.create(arch, d_in=d_in, d_sae=width, k=k, d_out=d_out, act_fn=act_fn, hook_name="blocks.0.ln2.hook_normalized",
                   hook_name_out="blocks.0.hook_mlp_out", model_name="tiny")
    with torch.no_grad():  # away from the init: biases, a skip path and thresholds that matter
        t.b_enc.normal_(0, 0.1)
        t.b_dec.normal_(0, 0.3)
        if t.skip:
            t.W_skip.normal_(0, 0.2)
    return t


@pytest.mark.parametrize(("arch", "act_fn"), CASES)
def test_shapes_and_the_output_equal_the_formula(arch, act_fn):
    """ŷ = σ(x W_enc + b_enc) W_dec + b_dec (+ x W_skipᵀ): b_dec is never subtracted from x (it has d_out entries)."""
    t = _make(arch, act_fn)
    assert isinstance(t, Transcoder) and t.W_dec.shape == (96, 16) and t.b_dec.shape == (16,)
    assert t.apply_b_dec_to_input is False
    x = torch.randn(40, 24)
    f = t.activation(x @ t.W_enc + t.b_enc)
    want = f @ t.W_dec + t.b_dec + (x @ t.W_skip.T if t.skip else 0)
    torch.testing.assert_close(t(x), want, rtol=1e-5, atol=1e-5)
    assert (f != 0).sum(-1).float().mean() > 0


@pytest.mark.parametrize(("arch", "act_fn"), CASES)
def test_loss_is_the_squared_error_to_the_target_and_its_gradients_reach_every_weight(arch, act_fn):
    t = _make(arch, act_fn)
    x, y = torch.randn(64, 24), torch.randn(64, 16)
    out = t.loss(x, step=10_000, target=y)
    torch.testing.assert_close(out["mse"], (y - out["x_hat"]).pow(2).sum(-1).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_hat"], t(x), rtol=1e-5, atol=1e-5)  # the whole output, skip path included
    out["loss"].backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if t.skip else ())):
        g = getattr(t, name).grad
        assert g is not None and float(g.abs().sum()) > 0, name
    if t.skip:  # ∂‖y − ŷ‖²/∂W_skip of the mse term: −2/B Σ (y − ŷ)ᵀ x, as autograd gives through the target
        t.zero_grad()
        t.loss(x, step=10_000, target=y)["mse"].backward()
        want = -2 / len(x) * (y - t(x).detach()).T @ x
        torch.testing.assert_close(t.W_skip.grad, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(SaelabError, match="target="):
        t.loss(x)


@pytest.mark.parametrize("arch", TRANSCODERS)
def test_topk_fused_path_equals_the_dense_reference(arch):
    """The TopK transcoder's fused encode + sparse decode against the dense path, on fresh random inputs: loss
    within 1e-5 relative, every gradient within 1e-4 (d_out ≠ d_in, so a decode of the wrong width fails)."""
    results = {}
    for kernel in ("reference", "chunked"):
        t = _make(arch, "topk", seed=3)
        t.kernel = kernel
        t.tokens_since_fired[:20] = 10**9  # some dead latents: the aux loss runs too
        torch.manual_seed(7)
        x, y = torch.randn(128, 24), torch.randn(128, 16)
        out = t.loss(x, target=y)
        out["loss"].backward()
        results[kernel] = (out["loss"].detach(), {n: p.grad.clone() for n, p in t.named_parameters()})
    (l_ref, g_ref), (l_fused, g_fused) = results["reference"], results["chunked"]
    torch.testing.assert_close(l_fused, l_ref, rtol=1e-5, atol=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g_fused[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize(("arch", "act_fn"), CASES)
def test_save_and_load_give_the_same_transcoder(arch, act_fn, tmp_path):
    t = _make(arch, act_fn)
    t.save(tmp_path / "tc")
    u = SAE.load(tmp_path / "tc")
    assert type(u) is type(t) and u.cfg.d_out == 16 and u.cfg.hook_name_out == "blocks.0.hook_mlp_out"
    x = torch.randn(8, 24)
    torch.testing.assert_close(u(x), t(x))
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["d_out"] == 16 and cfg["apply_b_dec_to_input"] is False
    assert cfg["architecture"] == t.saelens_arch
    assert cfg["architecture"] != "transcoder" or act_fn == "relu"  # SAELens reads "transcoder" as ReLU


def test_a_weights_file_of_other_sizes_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    t = _make("skip-transcoder", "relu")
    t.save(tmp_path / "tc")
    w = load_file(tmp_path / "tc" / "sae_weights.safetensors")
    save_file({**w, "W_skip": torch.zeros(16, 25)}, tmp_path / "tc" / "sae_weights.safetensors")
    with pytest.raises(SaelabError, match=r"W_skip has shape \(16, 25\) but d_in 24, d_out 16 and d_sae 96"):
        SAE.load(tmp_path / "tc")
    save_file({k: v for k, v in w.items() if k != "W_skip"}, tmp_path / "tc" / "sae_weights.safetensors")
    with pytest.raises(SaelabError, match="lacks W_skip"):
        SAE.load(tmp_path / "tc")


@pytest.mark.parametrize(("arch", "act_fn"), CASES)
def test_folding_the_two_scales_maps_raw_inputs_to_raw_targets(arch, act_fn):
    """Trained on (s·x → s_out·y): after folding, T(x) = T_scaled(s·x) / s_out, codes unchanged."""
    t = _make(arch, act_fn)
    s, s_out = 2.5, 0.4
    x = torch.randn(32, 24)
    want_out, want_codes = t(s * x) / s_out, t.encode(s * x)
    t.fold_input_scale(s, s_out)
    torch.testing.assert_close(t(x), want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t.encode(x), want_codes, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- the CLI, end to end
def test_train_writes_one_transcoder_per_pair_and_eval_replaces_each_mlp(mlp_coders, mlp_pairs, capsys):
    from saelab.cli import main
    from saelab.layout import read_eval, read_group

    for arch in TRANSCODERS:
        _, folders = read_group(mlp_coders / arch)
        assert sorted(folders) == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
        for hook, folder in folders.items():
            t = SAE.load(folder)
            assert t.cfg.arch == arch and t.cfg.hook_name == hook
            assert t.cfg.hook_name_out == hook.replace("ln2.hook_normalized", "hook_mlp_out")
            assert 0 < read_eval(folder)["fvu"] < 1  # scored against the MLP's output, not its input
    capsys.readouterr()
    folder = mlp_coders / "skip-transcoder" / "blocks.1.ln2.hook_normalized"
    assert main(["eval", "--sae", str(folder), "--model", "tiny", "--contexts", "16"]) == 0
    assert "CE-loss recovered" in capsys.readouterr().out
    ev = read_eval(folder)
    assert ev["ce_zero_ablation"] > ev["ce_sae"] > ev["ce_clean"] - 0.05, ev  # the MLP replaced, not its input
    assert 0 < ev["ce_loss_recovered"] <= 1.05 and ev["kl"] > 0


def test_the_skip_path_lowers_the_fvu_at_equal_k(mlp_coders):
    from saelab.layout import read_eval

    for layer in (0, 1):
        hook = f"blocks.{layer}.ln2.hook_normalized"
        plain, skip = (read_eval(mlp_coders / arch / hook)["fvu"] for arch in TRANSCODERS)
        assert skip <= plain, (layer, plain, skip)


def test_steering_a_transcoder_latent_writes_at_its_output_hook(mlp_coders, tiny):
    from saelab.analysis.steering import prompt_latents, steer
    model = tiny
    t = SAE.load(mlp_coders / "transcoder" / "blocks.1.ln2.hook_normalized")
    _, acts = prompt_latents(model, t, "The king said to the queen")
    latent = int(acts.sum(0).argmax())
    assert steer(model, t, "The king said", [(latent, "add", 0.0)], max_new_tokens=3).metrics["kl"] == 0
    assert steer(model, t, "The king said", [(latent, "add", 30.0)], max_new_tokens=3).metrics["kl"] > 1e-3
    assert steer(model, t, "The king said", [(latent, "ablate")], max_new_tokens=3).metrics["kl"] > 0


def test_bad_transcoder_input_is_one_line(mlp_pairs, mlp_coders, tmp_path, capsys):
    from tests.test_outputs import _fails

    from saelab.cli import main

    store = mlp_pairs / "blocks.0.hook_mlp_out"  # the target side of its pair: no pair reads it
    _fails(["train", "--arch", "transcoder", "--activations", str(store), "--out", str(tmp_path / "a")], capsys,
           "is the target of a pair")
    assert main(["synthetic", "--out", str(tmp_path / "plain"), "--rows", "4096", "--quiet"]) == 0  # no pair at all
    _fails(["train", "--arch", "skip-transcoder", "--activations", str(tmp_path / "plain"), "--out", str(tmp_path / "e")],
           capsys, "--pair")
    _fails(["train", "--arch", "topk", "--act-fn", "relu", "--activations", str(mlp_pairs), "--out",
            str(tmp_path / "b")], capsys, "--act-fn applies to --arch transcoder")
    _fails(["train", "--arch", "transcoder", "--l1-coeff", "0.1", "--activations", str(mlp_pairs), "--out",
            str(tmp_path / "c")], capsys, "pass --act-fn relu")
    _fails(["train", "--arch", "transcoder", "--hook", "blocks.0.hook_resid_post", "--activations", str(mlp_pairs),
            "--out", str(tmp_path / "d")], capsys, "no pair of stores")
    _fails(["circuit", "--saes", str(mlp_coders / "transcoder"), "--task", "ioi"], capsys, "pass a group of SAEs")
    assert not any((tmp_path / n).exists() for n in "abcde")


# ----------------------------------------------------------------------------------- planted paired data, the CLI
@pytest.fixture(scope="module")
def planted_coders(tmp_path_factory):
    """synthetic --d-out (d_in 64 → d_out 48, 256 planted features, ~5 active: y = c·B where x = c·A), and a
    transcoder and a skip transcoder at equal k trained on it from the CLI (1.2M tokens each)."""
    from saelab.cli import main

    root = tmp_path_factory.mktemp("planted")
    assert main(["synthetic", "--out", str(root / "run"), "--d", "64", "--n-true", "256", "--active", "5",
                 "--d-out", "48", "--rows", "131072", "--quiet"]) == 0
    for arch in TRANSCODERS:
        assert main(["train", "--arch", arch, "--activations", str(root / "run"), "--out", str(root / arch), "--k", "5",
                     "--width", "512", "--tokens", "1200000", "--batch-size", "1024", "--quiet"]) == 0
        assert main(["eval", "--sae", str(root / arch), "--suite", "core,truth", "--quiet"]) == 0
    return root


def test_a_transcoder_recovers_the_planted_map(planted_coders):
    """Its decoder rows match the planted output directions B (the truth suite over the target store: MMCS ≥ 0.9;
    measured 0.998); its codes come from the input rows."""
    from saelab.layout import read_eval

    truth = read_eval(planted_coders / "transcoder")["truth"]
    assert truth["mmcs"] >= 0.9 and truth["mcc"] >= 0.9, truth


def test_without_superposition_a_transcoder_recovers_both_sides_of_the_planted_map(tmp_path):
    """48 planted features in 64 input dimensions (no superposition: the input directions A have a readout, their
    dual basis pinv(A), which computes each coefficient), mapped to 48 output directions B. A transcoder trained from
    the CLI recovers both sides: its encoder columns match the readout (MMCS ≥ 0.9; measured 0.95 at seeds 0 and 1)
    and its decoder rows match B (≥ 0.9; measured 0.998). The encoder matches the readout, not A itself (0.60): an
    encoder computes coefficients, and with 256 features in 64 dimensions (the test above) no exact readout exists."""
    from saelab.cli import main
    from saelab.sae import SAE
    from saelab.synthetic import load_truth

    assert main(["synthetic", "--out", str(tmp_path / "run"), "--d", "64", "--n-true", "48", "--active", "3",
                 "--d-out", "48", "--rows", "65536", "--quiet"]) == 0
    assert main(["train", "--arch", "transcoder", "--activations", str(tmp_path / "run"), "--out", str(tmp_path / "tc"),
                 "--k", "3", "--width", "96", "--tokens", "1200000", "--batch-size", "1024", "--quiet"]) == 0
    t = SAE.load(tmp_path / "tc")
    A, _ = load_truth(tmp_path / "run" / "synthetic.in")
    B, _ = load_truth(tmp_path / "run" / "synthetic.out")

    def mmcs(rows, truth):
        rows = rows / rows.norm(dim=1, keepdim=True)
        truth = truth / truth.norm(dim=1, keepdim=True)
        return float((rows @ truth.T).abs().max(0).values.mean())

    readout = torch.linalg.pinv(A).T  # [48, 64]: row i reads coefficient i off x = c·A
    assert mmcs(t.W_enc.detach().T, readout) >= 0.9
    assert mmcs(t.W_dec.detach(), B) >= 0.9


def test_on_planted_data_the_skip_path_lowers_the_fvu_at_equal_k(planted_coders):
    from saelab.layout import read_eval

    plain, skip = (read_eval(planted_coders / arch) for arch in TRANSCODERS)
    assert plain["l0"] == pytest.approx(skip["l0"], abs=0.1)
    assert skip["fvu"] <= plain["fvu"], (plain["fvu"], skip["fvu"])


def test_head_shares_follow_the_hook_a_decoder_writes():
    """A transcoder from attn.hook_z to hook_attn_out writes d_model vectors, not heads: no head shares; an SAE
    reading attn.hook_z (heads flattened) gets them."""
    from types import SimpleNamespace

    from saelab.analysis.features.build import _head_layout

    store = SimpleNamespace(hook="blocks.0.attn.hook_z", manifest={"head_layout": {"n_heads": 4, "d_head": 32}})
    model = SimpleNamespace(cfg=SimpleNamespace(n_heads=4))
    sae = SAE.create("topk", d_in=128, d_sae=256, k=4, hook_name="blocks.0.attn.hook_z")
    assert _head_layout(store, sae, model) == {"n_heads": 4, "layer": 0}
    tc = SAE.create("transcoder", d_in=128, d_out=128, d_sae=256, k=4, hook_name="blocks.0.attn.hook_z",
                    hook_name_out="blocks.0.hook_attn_out")
    assert _head_layout(store, tc, model) is None
