"""The cross-layer transcoder: its output against the plain formula, the mask, scale folding, files; trained from
the CLI over every pair of a RUN folder, evaluated with every MLP replaced, and refused where one layer is read."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import SAE
from tests.test_outputs import _fails

PAIRS = [f"blocks.{L}.ln2.hook_normalized:blocks.{L}.hook_mlp_out" for L in range(3)]


ACTS = ["topk", "relu", "jumprelu"]


def _clt(seed=0, act_fn="topk"):
    torch.manual_seed(seed)
    c = SAE.create("clt", d_in=12, d_out=10, d_sae=40, k=4, clt_pairs=PAIRS, hook_name="blocks.0.ln2.hook_normalized",
                   hook_name_out="blocks.0.hook_mlp_out", model_name="tiny", act_fn=act_fn)
    with torch.no_grad():
        c.b_enc.normal_(0, 0.1)
        c.b_dec.normal_(0, 0.3)
        if act_fn == "jumprelu":  # thresholds that differ by layer and latent, some above most pre-activations
            c.log_threshold.copy_(torch.empty(3, 40).uniform_(0.05, 0.6).log())
    return c


def _plain_codes(c, z, l, act_fn):
    if act_fn == "topk":
        v, i = z.topk(4, dim=-1)
        return torch.zeros_like(z).scatter(-1, i, v.relu())
    if act_fn == "relu":
        return z.relu()
    return z * (z > c.log_threshold[l].exp())


@pytest.mark.parametrize("act_fn", ACTS)
def test_each_output_is_what_the_layers_up_to_it_write(act_fn):
    """ŷ_m = Σ_{l ≤ m} σ(x_l W_enc[l] + b_enc[l]) W_dec[l, :, m] + b_dec[m], against a plain loop (1e-5), for each
    activation σ (TopK: k per layer; JumpReLU: layer l's own thresholds)."""
    c = _clt(act_fn=act_fn)
    assert type(c).__name__ == {"topk": "TopKCLT", "relu": "ReluCLT", "jumprelu": "JumpReluCLT"}[act_fn]
    x = torch.randn(16, 3, 12)
    want, codes = torch.zeros(16, 3, 10), torch.zeros(16, 3, 40)
    for m in range(3):
        want[:, m] = c.b_dec[m]
        for l in range(m + 1):
            f = _plain_codes(c, x[:, l] @ c.W_enc[l] + c.b_enc[l], l, act_fn)
            codes[:, l] = f
            want[:, m] += f @ c.W_dec[l, :, m]
    with torch.no_grad():
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.encode(x), codes, rtol=1e-5, atol=1e-5)
    n = (codes != 0).sum(-1).float()
    assert (n <= 4).all() if act_fn == "topk" else 4 < float(n.mean()) < 40  # the dense ones: no cap


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu"])
def test_the_sparsity_term_is_the_activations_over_every_layer(act_fn):
    """ReLU: λ Σ_l Σ_i f_li ‖W_dec[l, i, l:]‖ (each latent's decoders to the layers it writes, concatenated); JumpReLU:
    λ Σ_l L0_l, with the threshold learning through its straight-through estimator only (layer by layer; a layer
    whose pre-activations are all far from its thresholds sends it nothing). Against plain sums (1e-5)."""
    c = _clt(act_fn=act_fn)
    c.control.log_coeff.fill_(0.0)  # λ = 1
    x, y = torch.randn(32, 3, 12), torch.randn(32, 3, 10)
    out = c.loss(x, step=10 ** 6, target=y)  # after the warm-up
    f = torch.stack([_plain_codes(c, x[:, l] @ c.W_enc[l] + c.b_enc[l], l, act_fn) for l in range(3)], 1)
    if act_fn == "relu":
        norms = torch.stack([c.W_dec[l, :, l:].flatten(1).norm(dim=-1) for l in range(3)])
        want = (f * norms).sum(-1).mean(0).sum()
    else:
        want = (f != 0).sum(-1).float().mean(0).sum()
    torch.testing.assert_close(out["l1" if act_fn == "relu" else "l0"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["mse"] + want, rtol=1e-5, atol=1e-5)
    if act_fn == "jumprelu":
        with torch.no_grad():
            c.log_threshold[1] = 10.0  # e^10: far above every pre-activation of layer 1 (no STE window reaches it)
        c.loss(x, step=10 ** 6, target=y)["loss"].backward()
        g = c.log_threshold.grad
        assert float(g[1].abs().sum()) == 0 and float(g[0].abs().sum()) > 0 and float(g[2].abs().sum()) > 0


def test_a_layer_never_writes_to_an_earlier_one():
    c = _clt()
    x, y = torch.randn(32, 3, 12), torch.randn(32, 3, 10)
    with torch.no_grad():
        c.W_dec[2, :, 0] = 100.0  # an entry the mask drops: it changes nothing, and learns nothing
    out = c.loss(x, target=y)
    out["loss"].backward()
    assert float(c.W_dec.grad[2, :, 0].abs().sum()) == 0 and float(c.W_dec.grad[0, :, 2].abs().sum()) > 0
    torch.testing.assert_close(out["mse"], (y - out["x_hat"]).pow(2).sum(-1).mean(0).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_fn", ACTS)
def test_folding_the_layer_scales_keeps_raw_inputs_to_raw_outputs_and_files_load(tmp_path, act_fn):
    c = _clt(act_fn=act_fn)
    x, y = torch.randn(64, 3, 12) * 3, torch.randn(64, 3, 10) * 0.2
    c.init_from_sample(x, y, lambda rows: rows.mean(0))
    assert not torch.allclose(c.in_scale, torch.ones(3))
    want, codes = c(x), c.encode(x)
    c.fold_input_scale()
    torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.encode(x), codes, rtol=1e-4, atol=1e-5)
    c.save(tmp_path / "clt")
    back = SAE.load(tmp_path / "clt")
    assert back.cfg.clt_pairs == PAIRS and back.n_layers == 3 and type(back) is type(c)
    if act_fn == "jumprelu":
        torch.testing.assert_close(back.threshold, c.threshold, rtol=1e-6, atol=0)
    torch.testing.assert_close(back(x), want, rtol=1e-4, atol=1e-5)


def test_cli_trains_one_clt_over_every_pair_and_eval_replaces_every_mlp(clt_folder, mlp_coders, tiny, capsys):
    from saelab.cli import main
    from saelab.evaluate import evaluate_replacement
    from saelab.layout import read_eval
    from saelab.store import ActivationStore

    c = SAE.load(clt_folder)
    assert c.cfg.arch == "clt" and c.cfg.clt_pairs == [f"blocks.{L}.ln2.hook_normalized:blocks.{L}.hook_mlp_out"
                                                       for L in range(2)]
    ev = read_eval(clt_folder)
    assert len(ev["fvu_layers"]) == 2 and all(0 < f < 1 for f in ev["fvu_layers"])
    assert ev["l0_total"] == pytest.approx(16, abs=0.1)
    capsys.readouterr()
    assert main(["eval", "--sae", str(clt_folder), "--model", "tiny", "--contexts", "16"]) == 0
    ev = read_eval(clt_folder)
    assert ev["ce_zero_ablation"] > ev["ce_sae"] and 0 < ev["ce_loss_recovered"] <= 1.05
    # the per-layer transcoders at the same total L0 replace both MLPs too: both numbers are defined
    coders = {L: SAE.load(mlp_coders / "transcoder" / f"blocks.{L}.ln2.hook_normalized") for L in range(2)}
    toks = ActivationStore(json.loads((clt_folder / "train.json").read_text())["store"]).tokens("holdout")[:16]
    per_layer, whole = evaluate_replacement(coders, tiny, toks), evaluate_replacement(c, tiny, toks)
    assert 0 < per_layer["ce_loss_recovered"] <= 1.05
    assert whole["ce_sae"] == pytest.approx(ev["ce_sae"], rel=1e-4)  # eval's CE is this replacement's
    assert 0 < per_layer["ce_loss_recovered"] <= 1.05


def test_commands_that_read_one_layer_refuse_a_clt_in_one_line(clt_folder, mlp_pairs, tmp_path, capsys):
    for argv, what in ((["analyze", "--sae", clt_folder], "saelab analyze"),
                       (["steer", "--sae", clt_folder, "--prompt", "the king", "--steer", "1:add:2"], "steering"),
                       (["eval", "--sae", clt_folder, "--suite", "truth"], "the truth suite")):
        _fails(argv, capsys, f"{what} reads one layer's SAE or transcoder")
    _fails(["train", "--arch", "clt", "--activations", tmp_path / "none", "--out", tmp_path / "x"], capsys,
           "--activations")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SaelabError, match=r"reads 2 layers of d_in 12"):
        SAE.create("clt", d_in=12, d_sae=24, k=2, clt_pairs=PAIRS[:2]).encode(torch.randn(3, 12))


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu"])
def test_cli_trains_a_relu_or_jumprelu_clt_that_evaluates_and_traces(act_fn, mlp_pairs, tiny, tmp_path, capsys):
    """``saelab train --arch clt --act-fn relu|jumprelu`` from the CLI: the folder loads as that activation's CLT
    (JumpReLU: its [layers, latents] thresholds in the weights file), its L0 controller moved towards --k, and the
    CLT is evaluated with both MLPs replaced and traced into a graph whose nodes it wrote."""
    from safetensors import safe_open

    from saelab.analysis.graphs import load_graph
    from saelab.cli import main
    from saelab.layout import read_eval

    out = tmp_path / act_fn
    assert main(["train", "--arch", "clt", "--act-fn", act_fn, "--activations", str(mlp_pairs), "--out", str(out),
                 "--k", "8", "--expansion", "2", "--tokens", "40960", "--batch-size", "512", "--quiet"]) == 0
    c = SAE.load(out)
    assert c.cfg.act_fn == act_fn and type(c).__name__ == {"relu": "ReluCLT", "jumprelu": "JumpReluCLT"}[act_fn]
    with safe_open(str(out / "sae_weights.safetensors"), "pt") as f:
        assert ("threshold" in f.keys()) == (act_fn == "jumprelu")
        if act_fn == "jumprelu":
            assert list(f.get_slice("threshold").get_shape()) == [2, c.d_sae]
    logged = [json.loads(line)["sparsity_coeff"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "sparsity_coeff" in json.loads(line)]
    start = {"relu": 0.1, "jumprelu": 0.05}[act_fn]
    assert logged and abs(math.log(logged[-1] / start)) > 0.05  # the controller moved λ towards L0 = k
    ev = read_eval(out)
    assert all(0 < f < 1 for f in ev["fvu_layers"]) and ev["l0_total"] > 0
    assert main(["eval", "--sae", str(out), "--model", "tiny", "--contexts", "8", "--quiet"]) == 0
    assert 0 < read_eval(out)["ce_loss_recovered"] <= 1.05
    graph = tmp_path / "g.json"
    assert main(["attribute", "--sae", str(out), "--prompt", "the king said to the queen that he", "--out", str(graph),
                 "--quiet"]) == 0
    nodes = load_graph(graph)["nodes"]
    assert {n["layer"] for n in nodes if n["kind"] == "feature"} <= {0, 1} and any(n["kind"] == "feature" for n in nodes)
    capsys.readouterr()


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu"])
def test_dense_codes_kept_as_pairs_decode_alike(act_fn):
    """A dense layer code (relu, jumprelu) as the (values, indices) of its non-zero entries writes the same output
    through decode_layer (1e-5), and holds no more entries per row than the most any row fires."""
    from saelab.sae.clt import as_pairs, decode_layer

    c = _clt(act_fn=act_fn)
    x = torch.randn(32, 12)
    with torch.no_grad():
        code = c.layer_codes(x, 1)
        v, i = as_pairs(code)
        W = c.W_dec[1].reshape(40, -1)
        torch.testing.assert_close(decode_layer((v, i), W), decode_layer(code, W), rtol=1e-5, atol=1e-5)
    assert v.shape[1] == int((code != 0).sum(-1).max()) < 40 or act_fn == "relu"
