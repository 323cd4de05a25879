"""The cross-layer transcoder: its output against the plain formula, the mask, scale folding, files; trained from
the CLI over every pair of a RUN folder, evaluated with every MLP replaced, and refused where one layer is read."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import SAE
from tests.test_outputs import _fails

PAIRS = [f"blocks.{L}.ln2.hook_normalized:blocks.{L}.hook_mlp_out" for L in range(3)]


def _clt(seed=0):
    torch.manual_seed(seed)
    c = SAE.create("clt", d_in=12, d_out=10, d_sae=40, k=4, clt_pairs=PAIRS, hook_name="blocks.0.ln2.hook_normalized",
                   hook_name_out="blocks.0.hook_mlp_out", model_name="tiny")
    with torch.no_grad():
        c.b_enc.normal_(0, 0.1)
        c.b_dec.normal_(0, 0.3)
    return c


def test_each_output_is_what_the_layers_up_to_it_write():
    """ŷ_m = Σ_{l ≤ m} TopK(x_l W_enc[l] + b_enc[l]) W_dec[l, :, m] + b_dec[m], against a plain loop (1e-5)."""
    c = _clt()
    x = torch.randn(16, 3, 12)
    want = torch.zeros(16, 3, 10)
    for m in range(3):
        want[:, m] = c.b_dec[m]
        for l in range(m + 1):
            z = x[:, l] @ c.W_enc[l] + c.b_enc[l]
            v, i = z.topk(4, dim=-1)
            f = torch.zeros_like(z).scatter(-1, i, v.relu())
            want[:, m] += f @ c.W_dec[l, :, m]
    torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)
    assert ((c.encode(x) != 0).sum(-1) <= 4).all()


def test_a_layer_never_writes_to_an_earlier_one():
    c = _clt()
    x, y = torch.randn(32, 3, 12), torch.randn(32, 3, 10)
    with torch.no_grad():
        c.W_dec[2, :, 0] = 100.0  # an entry the mask drops: it changes nothing, and learns nothing
    out = c.loss(x, target=y)
    out["loss"].backward()
    assert float(c.W_dec.grad[2, :, 0].abs().sum()) == 0 and float(c.W_dec.grad[0, :, 2].abs().sum()) > 0
    torch.testing.assert_close(out["mse"], (y - out["x_hat"]).pow(2).sum(-1).mean(0).sum(), rtol=1e-5, atol=1e-5)


def test_folding_the_layer_scales_keeps_raw_inputs_to_raw_outputs_and_files_load(tmp_path):
    c = _clt()
    x, y = torch.randn(64, 3, 12) * 3, torch.randn(64, 3, 10) * 0.2
    c.init_from_sample(x, y, lambda rows: rows.mean(0))
    assert not torch.allclose(c.in_scale, torch.ones(3))
    want, codes = c(x), c.encode(x)
    c.fold_input_scale()
    torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.encode(x), codes, rtol=1e-4, atol=1e-5)
    c.save(tmp_path / "clt")
    back = SAE.load(tmp_path / "clt")
    assert back.cfg.clt_pairs == PAIRS and back.n_layers == 3
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
    _fails(["train", "--arch", "clt", "--act-fn", "relu", "--activations", mlp_pairs, "--out", tmp_path / "x"], capsys,
           "--arch clt takes --act-fn topk")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SaelabError, match=r"reads 2 layers of d_in 12"):
        SAE.create("clt", d_in=12, d_sae=24, k=2, clt_pairs=PAIRS[:2]).encode(torch.randn(3, 12))
