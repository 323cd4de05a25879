"""The matching-pursuit SAE (--arch mp): the batched pursuit against a plain per-row reference (codes,
reconstruction, gradients), early stopping by residual, batch independence, scale folding, the saved folder
(SAELens's matching_pursuit layout) and the CLI from a planted store to its truth scores."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import SaelabError
from saelab.sae import SAE
from saelab.sae.mp import merge_repeats, pursuit


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _sae(d_in=12, d_sae=40, k=5, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    sae = SAE.create("mp", d_in=d_in, d_sae=d_sae, k=k, **kw).to(dtype)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
    return sae


def reference(W, b, x, k, tau=0.0):
    """Matching pursuit of each row on its own, written plainly (Python loops over rows, steps and atoms):
    r = x − b; k times (fewer once ‖r‖ < τ‖x − b‖) the atom of the largest ⟨r, w_j⟩ (the first on a tie),
    its coefficient max(⟨r, w_j⟩, 0) added to its code and c·w_j taken from r. Differentiable in W and b."""
    codes = []
    for row in x:
        r = row - b
        r0 = float(r.detach().norm())
        f = [W.new_zeros(()) for _ in range(len(W))]
        for _ in range(k):
            if tau > 0 and float(r.detach().norm()) < tau * r0:
                break
            scores = [float(r.detach() @ W[j].detach()) for j in range(len(W))]
            j = max(range(len(W)), key=scores.__getitem__)
            c = torch.clamp(r @ W[j], min=0)
            f[j] = f[j] + c
            r = r - c * W[j]
        codes.append(torch.stack(f))
    return torch.stack(codes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_pursuit_matches_the_per_row_reference(seed):
    """Fresh random inputs, float64: the batched encode's codes equal the reference's to 1e-12, the reconstruction
    too, and the training loss's gradients in W_dec and b_dec equal those of the reference's loss to rtol 1e-9
    (both backpropagate through the unrolled steps). In float32 the same atoms are chosen and the codes agree to
    1e-4 of the float64 ones."""
    sae = _sae(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(24, 12, generator=g, dtype=torch.float64) * 2
    W = sae.W_dec.detach().clone().requires_grad_(True)
    b = sae.b_dec.detach().clone().requires_grad_(True)
    ref = reference(W, b, x, sae.cfg.k)
    ref_hat = ref @ W + b
    ((x - ref_hat).pow(2).sum(-1).mean()).backward()
    f = sae.encode(x)
    torch.testing.assert_close(f, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sae.decode(f), ref_hat.detach(), rtol=0, atol=1e-12)
    assert ((f != 0).sum(-1) <= sae.cfg.k).all() and (f >= 0).all()
    out = sae.loss(x)
    torch.testing.assert_close(out["x_hat"], ref_hat.detach(), rtol=0, atol=1e-12)
    out["mse"].backward()
    torch.testing.assert_close(sae.W_dec.grad, W.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sae.b_dec.grad, b.grad, rtol=1e-9, atol=1e-12)
    # the choice of atoms passes no gradient: a row that no token chose gets none from the reconstruction
    unchosen = (f == 0).all(0)
    assert unchosen.any() and (sae.W_dec.grad[unchosen] == 0).all() and sae.W_dec.grad[~unchosen].abs().sum() > 0
    # the training codes (values, indices; a repeated atom merged into its first slot) are the encode's
    v, i = out["codes"]
    torch.testing.assert_close(torch.zeros_like(f).scatter_add_(-1, i, v), f, rtol=0, atol=1e-12)
    assert torch.equal((v != 0).sum(-1), (f != 0).sum(-1))
    f32 = sae.float().encode(x.float())
    assert torch.equal(f32 != 0, f != 0)
    torch.testing.assert_close(f32.double(), f, rtol=0, atol=1e-4)


def test_a_repeated_atom_adds_to_its_code_and_counts_once():
    """Two atoms at 120° and x mostly along the first: after the second atom the residual leans on the first again,
    so the third step returns to it, its coefficients add up, and the merged training codes count it once (L0 2
    after 3 steps)."""
    W = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 3 ** 0.5 / 2, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    v, i, r = pursuit(x, W, 3)
    assert i[0].tolist()[0] == i[0].tolist()[2] != i[0].tolist()[1]
    merged = merge_repeats(v, i)
    assert int((merged != 0).sum()) == 2
    torch.testing.assert_close(merged.sum(), v.sum())
    torch.testing.assert_close(x - r, torch.zeros(1, 3, dtype=torch.float64).scatter_add_(-1, i, v)[:, :3] @ W)


def test_early_stop_by_residual():
    """--mp-residual τ: a token stops before a step once ‖r‖ < τ‖x − b_dec‖ (the reference's rule, codes equal); a
    token one atom explains uses one latent, where τ = 0 takes all k steps; a larger τ never uses more latents;
    training takes k steps whatever τ is."""
    base = _sae()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    W = base.W_dec.detach()
    l0s = []
    for tau in (0.0, 0.3, 0.6, 0.9):
        sae = copy.deepcopy(base)
        sae.cfg.mp_residual = tau
        f = sae.encode(x)
        torch.testing.assert_close(f, reference(W, sae.b_dec.detach(), x, sae.cfg.k, tau), rtol=0, atol=1e-12)
        ratio = ((x - sae.decode(f)).norm(dim=-1) / (x - sae.b_dec).norm(dim=-1)).detach()
        if tau:  # a token whose codes the stop changed ended under the bound; none reconstructs better than at τ 0
            stopped = (f != l0s_f[0]).any(-1)
            assert stopped.any() and (ratio[stopped] < tau).all()
            assert (ratio >= ratio0 - 1e-12).all()
        else:
            l0s_f, ratio0 = [f], ratio
        l0s.append((f != 0).sum(-1))
        torch.testing.assert_close(sae.loss(x)["mse"], base.loss(x)["mse"], rtol=0, atol=0)
    assert all((a >= b).all() for a, b in zip(l0s, l0s[1:])) and l0s[-1].float().mean() < l0s[0].float().mean()
    one = (base.b_dec + 3 * W[5] + 0.01 * torch.randn(12, generator=g, dtype=torch.float64))[None]
    assert int((base.encode(one) != 0).sum()) == base.cfg.k
    sae = copy.deepcopy(base)
    sae.cfg.mp_residual = 0.1
    f = sae.encode(one)
    assert (f != 0).sum() == 1 and float(f[0, 5].detach()) == pytest.approx(3, abs=0.05)


def test_inference_codes_do_not_depend_on_the_batch():
    """encode of a row gives its codes whatever rows come with it (float32, with and without the early stop), and
    [batch, pos, d_in] encodes as its flattened rows."""
    sae = _sae(d_in=16, d_sae=64, k=6, dtype=torch.float32)
    x = torch.randn(300, 16)
    for tau in (0.0, 0.5):
        sae.cfg.mp_residual = tau
        f = sae.encode(x)
        torch.testing.assert_close(f[:5], sae.encode(x[:5]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f[17:18], sae.encode(x[17:18]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f[100:], sae.encode(x.flip(0)).flip(0)[100:], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae.encode(x.reshape(3, 100, 16)), f.reshape(3, 100, 64), rtol=1e-6, atol=1e-6)


def test_folding_the_input_scale_divides_b_dec_only():
    """The trainer trains on s·x and folds s: the folded SAE's codes of raw x are the trained codes of s·x over s,
    its reconstruction the trained one over s, and its rows stay unit-norm (W_dec unchanged)."""
    sae = _sae(dtype=torch.float32)
    x, s = torch.randn(50, 12), 3.7
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(s)
    torch.testing.assert_close(folded.encode(x) * s, sae.encode(s * x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x) * s, sae(s * x), rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.W_dec, sae.W_dec)


def _saelens_encode(W, b, x, max_iterations, residual_threshold, stop_on_duplicate_support):
    """Our reading of SAELens's MatchingPursuitSAE.encode (sae_lens/saes/matching_pursuit_sae.py), from its
    documented behaviour: x − b_dec; each iteration the index of the largest ReLU(⟨r, w_j⟩), its value
    ReLU(⟨r, w_j⟩) scatter-added to the codes of the rows not yet done, r updated; a row is done once its support
    stops changing (when asked) or ‖r‖ < residual_threshold (when > 0)."""
    r = x - b
    acts = torch.zeros(len(x), len(W), dtype=x.dtype)
    prev = torch.zeros_like(acts, dtype=torch.bool)
    done = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(max_iterations):
        idx = (r @ W.T).relu().max(dim=1, keepdim=True).indices
        sel = W[idx[:, 0]]
        val = (r * sel).sum(-1, keepdim=True).relu() * (~done)[:, None]
        acts.scatter_add_(1, idx, val)
        r = r - val * sel
        support = acts != 0
        if stop_on_duplicate_support:
            done |= (support == prev).all(1)
            prev = support
        if residual_threshold > 0:
            done |= r.norm(dim=-1) < residual_threshold
    return acts


def test_saved_folder_is_saelens_matching_pursuit_and_round_trips(tmp_path):
    """save → load gives the same codes (the early stop kept); the weights file holds exactly W_dec and b_dec
    (SAELens's tied MatchingPursuitSAE loads its state dict strictly: a W_enc or b_enc would be refused); cfg.json
    is SAELens's matching_pursuit with max_iterations k, residual_threshold 0 and stop_on_duplicate_support false,
    and SAELens's pursuit under those settings, on the file's tensors, gives saelab's codes. --mp-residual > 0 is
    written under a name SAELens refuses. A SAELens folder (no saelab block) of those settings loads; one that
    stops on a repeated support (SAELens's default) is refused in one line."""
    sae = _sae(d_in=16, d_sae=64, k=6, dtype=torch.float32, hook_name="blocks.0.hook_resid_post")
    x = torch.randn(64, 16)
    sae.save(tmp_path / "a")
    w = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    assert sorted(w) == ["W_dec", "b_dec"] and w["W_dec"].shape == (64, 16)
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["max_iterations"], cfg["residual_threshold"], cfg["stop_on_duplicate_support"],
            cfg["apply_b_dec_to_input"], cfg["d_in"], cfg["d_sae"]) == ("matching_pursuit", 6, 0.0, False, True, 16, 64)
    theirs = _saelens_encode(w["W_dec"], w["b_dec"], x, cfg["max_iterations"], cfg["residual_threshold"],
                             cfg["stop_on_duplicate_support"])
    torch.testing.assert_close(theirs, sae.encode(x), rtol=1e-6, atol=1e-6)
    back = SAE.load(tmp_path / "a")
    assert back.arch == "mp" and back.cfg.k == 6 and [n for n, _ in back.named_parameters()] == ["W_dec", "b_dec"]
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    sae.cfg.mp_residual = 0.4
    sae.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["architecture"] == "matching_pursuit_relative"
    back = SAE.load(tmp_path / "b")
    assert back.cfg.mp_residual == 0.4 and torch.equal(back.encode(x), sae.encode(x))
    assert (back.encode(x) != 0).sum(-1).float().mean() < 6
    # a folder as SAELens writes it: its own cfg fields, no saelab block
    foreign = tmp_path / "c"
    foreign.mkdir()
    save_file({"W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(foreign / "sae_weights.safetensors"))
    own = {"architecture": "matching_pursuit", "d_in": 16, "d_sae": 64, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"}, "residual_threshold": 0.0,
           "max_iterations": 6, "stop_on_duplicate_support": False}
    (foreign / "cfg.json").write_text(json.dumps(own))
    loaded = SAE.load(foreign)
    assert loaded.arch == "mp" and loaded.cfg.k == 6 and loaded.cfg.hook_name == "blocks.0.hook_resid_post"
    torch.testing.assert_close(loaded.encode(x), theirs, rtol=1e-6, atol=1e-6)
    (foreign / "cfg.json").write_text(json.dumps({**own, "stop_on_duplicate_support": True}))
    with pytest.raises(SaelabError, match="stop_on_duplicate_support True") as e:
        SAE.load(foreign)
    assert "\n" not in str(e.value)
    # the tied encoder is read-only: W_enc is W_decᵀ
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    with pytest.raises(AttributeError, match="set W_dec"):
        sae.W_enc = torch.nn.Parameter(torch.zeros(16, 64))


def test_cli_synthetic_train_eval_recovers_the_planted_features(tmp_path):
    """As a user would: `saelab synthetic` (the shipped generator's defaults: d 64, 256 features, ~5 active),
    `saelab train --arch mp`, `saelab eval --suite core,truth`. The planted features are recovered (MMCS ≥ 0.9;
    measured 0.996 at these 200 steps, 0.997 at 1,200), L0 ≤ k, and the saved SAE reads raw activations: eval's FVU is the
    trainer's. Under 20 s on one thread of a loaded machine."""
    store, out = tmp_path / "planted", tmp_path / "mp"
    r = _cli("synthetic", "--out", str(store), "--d", "64", "--n-true", "256", "--active", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("train", "--activations", str(store), "--arch", "mp", "--k", "5", "--width", "512", "--lr", "3e-3",
             "--batch-size", "1024", "--tokens", str(1024 * 200), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    trained = json.loads((out / "eval.json").read_text())
    r = _cli("eval", "--sae", str(out), "--suite", "core,truth", "--quiet")
    assert r.returncode == 0, r.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["truth"]["mmcs"] >= 0.9, ev["truth"]
    assert 0 < ev["l0"] <= 5 and ev["fvu"] < 0.3, ev
    assert ev["fvu"] == pytest.approx(trained["fvu"], rel=1e-4)
    assert sorted(load_file(str(out / "sae_weights.safetensors"))) == ["W_dec", "b_dec"]


@pytest.fixture(scope="module")
def small_planted(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(SyntheticConfig(out=str(tmp_path_factory.mktemp("mp") / "planted"), d=16, n_true=32,
                                           active=3, rows=8192, shard_rows=2048, holdout=0.25), progress=False)


@pytest.mark.parametrize("extra,needle", [
    (["--arch", "mp", "--mp-residual", "1.0"], "--mp-residual must be in [0, 1) (got 1.0)"),
    (["--arch", "mp", "--mp-residual", "-0.1"], "--mp-residual -0.1: pass a finite number at least 0"),
    (["--arch", "mp", "--mp-residual", "nan"], "--mp-residual nan: pass a finite number"),
    (["--arch", "topk", "--mp-residual", "0.2"], "--mp-residual applies to --arch mp only, and this run trains topk"),
    (["--arch", "mp", "--enc-init", "0.5"], "--enc-init 0.5 does not apply to --arch mp"),
    (["--arch", "mp", "--k", "64"], "--k 64 must be between 1 and 63"),
])
def test_bad_settings_are_one_line_errors(extra, needle, small_planted, tmp_path, capsys):
    from saelab.cli import main

    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["train", "--activations", str(small_planted), "--width", "64", "--tokens", "2048",
                 "--batch-size", "1024", "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_mp_trains_with_the_aux_loss_on_dead_atoms(small_planted, tmp_path):
    """A short run with atoms dead after 512 tokens: the aux term appears in the metrics and training ends with
    finite weights and unit-norm rows."""
    from saelab.cli import main

    out = tmp_path / "aux"
    args = ["train", "--activations", str(small_planted), "--arch", "mp", "--k", "3", "--width", "128",
            "--tokens", str(1024 * 30), "--batch-size", "256", "--lr", "3e-3", "--dead-tokens", "512",
            "--log-every", "5", "--out", str(out), "--quiet"]
    assert main(args) == 0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("aux" in rec for rec in lines), lines[-1]
    sae = SAE.load(out)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128), rtol=0, atol=1e-5)
    assert json.loads((out / "eval.json").read_text())["fvu"] < 0.5
