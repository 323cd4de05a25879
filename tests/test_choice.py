"""Feature Choice and Mutual Choice SAEs (saelab/sae/choice.py): each training selection against a plain reference
(codes, loss, gradients), the thresholds that replace it at inference (no batch dependence), aux_zipf_loss and its
Zipf fit by hand, save/load in SAELens's JumpReLU layout, the CLI from synthetic to eval, and the one-line errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.sae import SAE
from saelab.sae.choice import DENSITY_MOMENTUM, UNDERUSED, feature_choice, mutual_choice, zipf_expected

CHOICE = ["mutualchoice", "featurechoice"]


def _mutual_reference(z, n):
    """The n largest ReLU(z) of the whole matrix, by a sort of every (value, row, column) in Python."""
    r = F.relu(z)
    entries = sorted(((float(r[b, j]), b, j) for b in range(r.shape[0]) for j in range(r.shape[1])), reverse=True)
    mask = torch.zeros_like(r, dtype=torch.bool)
    for _, b, j in entries[:n]:
        mask[b, j] = True
    return mask


def _feature_reference(z, m):
    """Each latent's m largest ReLU(z) over the batch, one latent at a time."""
    r = F.relu(z)
    mask = torch.zeros_like(r, dtype=torch.bool)
    for j in range(r.shape[1]):
        col = [(float(r[b, j]), b) for b in range(r.shape[0])]
        for _, b in sorted(col, reverse=True)[:m]:
            mask[b, j] = True
    return mask


def _reference_mask(arch, z, k):
    if arch == "mutualchoice":
        return _mutual_reference(z, k * z.shape[0])
    return _feature_reference(z, int(k * z.shape[0] / z.shape[1] + 0.5))


def _sae(arch, seed=0, d_in=12, d_sae=48, k=3, **kw):
    torch.manual_seed(seed)
    sae = SAE.create(arch, d_in=d_in, d_sae=d_sae, k=k, **kw)
    with torch.no_grad():  # random biases: selections that differ from a plain ReLU's
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def test_selections_match_their_references():
    """mutual_choice keeps the n largest ReLU(z) of the matrix, feature_choice each column's m largest; the codes
    are ReLU(z) where kept, 0 elsewhere (exactly), on fresh random inputs (ties have probability 0)."""
    for seed in range(3):
        torch.manual_seed(seed)
        z = torch.randn(40, 24)
        for n in (1, 37, 120):
            f = mutual_choice(z, n)
            ref = _mutual_reference(z, n)
            torch.testing.assert_close(f, F.relu(z) * ref, rtol=0, atol=0)
            assert int((f != 0).sum()) == n
        for m in (1, 3, 40):
            f = feature_choice(z, m)
            ref = _feature_reference(z, m)
            torch.testing.assert_close(f, F.relu(z) * ref, rtol=0, atol=0)
            assert ((f != 0).sum(0) <= m).all()
    z = -torch.rand(8, 5)  # no positive pre-activation: nothing fires, whatever the budget
    assert not mutual_choice(z, 10).any() and not feature_choice(z, 3).any()


@pytest.mark.parametrize("arch", CHOICE)
def test_training_codes_loss_and_gradients_match_the_reference(arch):
    """The training loss, by hand from the reference selection: f = ReLU(z)·mask, mse ‖x − f W_dec − b_dec‖²
    (mean over the batch); the codes equal, the loss within 1e-6 and every parameter's gradient within 1e-5."""
    for seed in range(2):
        sae = _sae(arch, seed)
        x = torch.randn(64, 12)
        out = sae.loss(x)
        assert "aux" not in out  # nothing dead, no density seen yet: no auxiliary latents
        params = dict(sae.named_parameters())
        got = torch.autograd.grad(out["loss"], list(params.values()))
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        mask = _reference_mask(arch, z.detach(), 3)
        f = F.relu(z) * mask
        loss = (x - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
        want = torch.autograd.grad(loss, list(params.values()))
        torch.testing.assert_close(sae.dense_codes(out).detach(), f.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out["loss"].detach(), loss.detach(), rtol=1e-6, atol=1e-6)
        for name, g, w in zip(params, got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
        n = int((sae.dense_codes(out) != 0).sum())
        assert n == 3 * 64 if arch == "mutualchoice" else n <= 4 * 48  # m = round(3·64/48) = 4 per latent
        if arch == "featurechoice":
            assert ((sae.dense_codes(out) != 0).sum(0) <= 4).all()


def test_aux_zipf_loss_by_hand():
    """The auxiliary latents are the dead and the underused; the loss is the detached residual reconstructed from
    each token's top k_aux of their pre-activations (ReLU, no b_dec), times aux_coeff · min(n_aux / k_aux, 1); its
    gradient reaches only those latents' encoder columns and decoder rows."""
    sae = _sae("mutualchoice", 1, k_aux=4)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:5] = True
    sae.tokens_since_fired[dead] = 10**9
    sae.underused[40:43] = True
    aux = dead | sae.underused
    x = torch.randn(32, 12)
    out = sae.loss(x)
    sae.zero_grad()
    out["aux"].backward()
    assert torch.all(sae.W_dec.grad[~aux] == 0) and sae.W_dec.grad[aux].abs().sum() > 0
    assert torch.all(sae.W_enc.grad[:, ~aux] == 0)
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        err = x - out["x_hat"]
        err_hat = torch.zeros_like(x)
        ids = aux.nonzero().squeeze(1).tolist()
        for b in range(32):  # token by token: its 4 largest auxiliary pre-activations
            top = sorted(ids, key=lambda j: float(z[b, j]), reverse=True)[:4]
            for j in top:
                err_hat[b] += F.relu(z[b, j]) * sae.W_dec[j]
        expect = (1 / 32) * min(8 / 4, 1.0) * (err - err_hat).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["aux"].detach(), expect)


def test_zipf_fit_and_underused_latents():
    """Densities on an exact Zipf curve C·r^−α over the upper half of the ranks are fitted back exactly; the tail that
    falls under UNDERUSED of the curve is what after_step marks underused (and only that)."""
    n = 64
    rank = torch.arange(1, n + 1, dtype=torch.float32)
    curve = 0.2 * rank.pow(-0.8)
    density = curve.clone()
    density[48:] *= 0.1  # the tail falls away
    density[40:48] *= 0.8  # below the curve, above half of it
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    exp = zipf_expected(density[perm])
    torch.testing.assert_close(exp, curve[perm], rtol=1e-4, atol=1e-7)
    assert zipf_expected(torch.zeros(n)) is None
    sae = SAE.create("mutualchoice", d_in=8, d_sae=n, k=2)
    sae.density.copy_(density[perm])
    sae.after_step({"f": torch.zeros(10, n)}, 0)  # a batch where nothing fired: every density decays, ranks kept
    torch.testing.assert_close(sae.density, DENSITY_MOMENTUM * density[perm])
    want = torch.zeros(n, dtype=torch.bool)
    want[48:] = True
    assert torch.equal(sae.underused, want[perm]) and UNDERUSED == 0.5


@pytest.mark.parametrize("arch", CHOICE)
def test_thresholds_track_the_selection_and_inference_is_batch_independent(arch):
    """After a step each threshold is the smallest value its selection kept (mutual choice: of the whole batch, the
    same for every latent; feature choice: of the latent's own column); then an EMA. At inference f = z·[z > θ]:
    a token alone gets the code it gets in any batch (the same latents, the values to float rounding)."""
    sae = _sae(arch, 2, threshold_momentum=0.9)
    x = torch.randn(256, 12)
    out = sae.loss(x)
    sae.after_step(out, 0)
    f = sae.dense_codes(out).detach()
    pos = f.masked_fill(f <= 0, float("inf"))
    first = pos.min().expand(48) if arch == "mutualchoice" else pos.min(0).values
    torch.testing.assert_close(sae.threshold, first)
    if arch == "featurechoice":
        assert len(set(sae.threshold.tolist())) > 40  # one cut per latent
    out2 = sae.loss(torch.randn(256, 12))
    sae.after_step(out2, 1)
    f2 = sae.dense_codes(out2).detach()
    pos2 = f2.masked_fill(f2 <= 0, float("inf"))
    low2 = pos2.min().expand(48) if arch == "mutualchoice" else pos2.min(0).values
    torch.testing.assert_close(sae.threshold, 0.9 * first + 0.1 * low2)
    sae.eval()
    xs = torch.randn(100, 12)
    batch = sae.encode(xs)
    alone = torch.cat([sae.encode(xs[i:i + 1]) for i in range(100)])
    assert torch.equal(alone != 0, batch != 0)  # the same latents fire (the values: to the matmul's rounding)
    torch.testing.assert_close(alone, batch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sae.encode(torch.cat([xs[:7], torch.randn(500, 12) * 3]))[:7], batch[:7])
    z = sae.pre_acts(xs)
    torch.testing.assert_close(batch, z * (z > sae.threshold))
    assert sae.dense_codes(sae.loss(xs)).equal(batch)  # in eval mode the loss reads the inference codes


def test_feature_choice_m_from_k_and_batch_and_its_errors():
    """m = round(k·B/d_sae), --fc-m overrides it; m < 1 and m > B are one-line errors naming the fix."""
    sae = SAE.create("featurechoice", d_in=8, d_sae=64, k=3)
    assert [sae.tokens_per_latent(b) for b in (11, 100, 1000)] == [1, 5, 47]
    with pytest.raises(SaelabError) as e:
        sae.tokens_per_latent(10)  # 3·10/64 = 0.47 → 0
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "--batch-size to at least 11" in msg and "--fc-m 1" in msg, msg
    with pytest.raises(SaelabError, match="round"):
        sae.loss(torch.randn(10, 8))
    sae = SAE.create("featurechoice", d_in=8, d_sae=64, k=3, fc_m=2)
    assert sae.tokens_per_latent(10) == 2 and int((sae.dense_codes(sae.loss(torch.randn(10, 8))) != 0).sum(0).max()) <= 2
    with pytest.raises(SaelabError, match=r"--fc-m 2 is more tokens than a batch holds \(1 rows\)"):
        sae.loss(torch.randn(1, 8))
    with pytest.raises(SaelabError, match="--fc-m 0 is out of range"):
        SAE.create("featurechoice", d_in=8, d_sae=64, k=3, fc_m=0)


@pytest.mark.parametrize("arch", CHOICE)
def test_save_load_round_trip_in_saelens_jumprelu_layout(arch, tmp_path):
    """The folder is SAELens's JumpReLU (architecture "jumprelu", a threshold per latent in the weights, an
    unestimated one saved as 0); SAELens's JumpReLU encode of those tensors, relu(z)·[z > θ], gives saelab's codes;
    SAE.load gives back the same SAE."""
    from safetensors.torch import load_file

    sae = _sae(arch, 3, hook_name="blocks.0.hook_resid_post", model_name="tiny")
    sae.after_step(sae.loss(torch.randn(200, 12)), 0)
    sae.threshold[:2] = -1.0  # never estimated
    sae.eval().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["saelab"]["arch"] == arch
    w = load_file(tmp_path / "sae_weights.safetensors")
    assert sorted(w) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"] and w["threshold"].shape == (48,)
    assert w["threshold"][:2].eq(0).all()
    x = torch.randn(30, 12)
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    theirs = F.relu(z) * (z > w["threshold"])
    torch.testing.assert_close(sae.encode(x), theirs, rtol=1e-6, atol=1e-6)
    back = SAE.load(tmp_path)
    assert type(back) is type(sae)
    torch.testing.assert_close(back.threshold, sae.threshold.clamp_min(0))
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", CHOICE)
def test_cli_synthetic_train_eval(arch, tmp_path, capsys):
    """As a user runs it: saelab synthetic, saelab train --arch ARCH, saelab eval --suite core,truth; the folder
    loads as ARCH and its eval.json holds both suites."""
    from saelab.cli import main

    store, out = tmp_path / "planted", tmp_path / arch
    assert main(["synthetic", "--out", str(store), "--d", "16", "--n-true", "32", "--active", "3", "--rows", "16384",
                 "--quiet"]) == 0
    assert main(["train", "--activations", str(store), "--out", str(out), "--arch", arch, "--k", "3", "--width",
                 "64", "--tokens", str(1024 * 120), "--batch-size", "1024", "--lr", "3e-3", "--quiet"]) == 0
    assert main(["eval", "--sae", str(out), "--suite", "core,truth", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "FVU" in text and "mmcs" in text, text
    ev = json.loads((out / "eval.json").read_text())
    assert 0 < ev["fvu"] < 0.5 and 1 <= ev["l0"] <= 6, ev
    assert ev["truth"]["mmcs"] > 0.7 and ev["truth"]["dead_latents"] < 64, ev["truth"]
    sae = SAE.load(out)
    assert sae.arch == arch and (sae.threshold > 0).all()


@pytest.fixture
def tiny_planted(tmp_path):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(SyntheticConfig(out=str(tmp_path / "planted"), d=16, n_true=32, active=3, rows=8192,
                                           shard_rows=2048, holdout=0.25), progress=False)


@pytest.mark.parametrize("extra,needle", [
    (["--arch", "mutualchoice", "--fc-m", "3"], "--fc-m applies to --arch featurechoice only, and this run trains "
                                                "mutualchoice"),
    (["--arch", "featurechoice", "--fc-m", "0"], "--fc-m 0 is out of range"),
    (["--arch", "featurechoice", "--batch-size", "3"], "raise --batch-size to at least 4"),
    (["--arch", "featurechoice", "--fc-m", "300"], "--fc-m 300 is more tokens than a batch holds (256 rows)"),
    (["--arch", "mutualchoice", "--threshold-momentum", "1"], "--threshold-momentum"),
    (["--arch", "topk", "--fc-m", "3"], "--fc-m applies to --arch featurechoice only"),
])
def test_bad_settings_are_one_line(extra, needle, tiny_planted, tmp_path, capsys):
    from saelab.cli import main

    out = tmp_path / "o"
    args = ["train", "--activations", str(tiny_planted), "--k", "4", "--width", "32", "--batch-size", "256",
            "--tokens", "2048", "--out", str(out), "--quiet", *extra]  # a flag given twice: the last one counts
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
