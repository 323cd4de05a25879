"""Architecture-level checks of the pitfalls the reference libraries hit."""

import pytest
import torch

from saelab.config import ARCHS
from saelab.errors import SaelabError
from saelab.sae import SAE
from saelab.sae.jumprelu import jumprelu, step_fn
from saelab.sae.topk import select


def test_jumprelu_threshold_enters_the_ste_once():
    torch.manual_seed(0)
    sae = SAE.create("jumprelu", d_in=8, d_sae=32, k=4, bandwidth=0.5, init_threshold=0.3)
    x = torch.randn(64, 8)
    z = sae.pre_acts(x).detach()
    # gradient w.r.t. θ as a leaf ...
    theta = sae.threshold.detach().clone().requires_grad_(True)
    w = torch.randn(64, 32)
    ((jumprelu(z, theta, 0.5) * w).sum() + step_fn(z, theta, 0.5).sum()).backward()
    # ... and w.r.t. log θ through the module: exactly θ · ∂/∂θ (the chain rule applied once)
    t = sae.threshold
    ((jumprelu(z, t, 0.5) * w).sum() + step_fn(z, t, 0.5).sum()).backward()
    torch.testing.assert_close(sae.log_threshold.grad, theta.grad * theta.detach())
    # the rectangle-kernel pseudo-derivative of the step, by hand
    inside = ((z - theta) / 0.5).abs() < 0.5
    expect_step = -(1 / 0.5) * inside.float().sum(0)
    theta2 = theta.detach().clone().requires_grad_(True)
    step_fn(z, theta2, 0.5).sum().backward()
    torch.testing.assert_close(theta2.grad, expect_step)


def test_aux_k_uses_detached_residual_and_no_second_b_dec():
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4, k_aux=8)
    with torch.no_grad():
        sae.b_dec.normal_()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:16] = True  # 16 dead latents
    sae.tokens_since_fired[dead] = 10**9
    x = torch.randn(32, 16)
    out = sae.loss(x)
    sae.zero_grad()
    out["aux"].backward()
    # the residual is detached: no gradient reaches the decoder rows of live latents
    assert torch.all(sae.W_dec.grad[~dead] == 0) and sae.W_dec.grad[dead].abs().sum() > 0
    # the value, by hand: top-8 dead pre-activations (ReLU), decoded without b_dec, scaled once
    with torch.no_grad():
        z = sae.pre_acts(x).masked_fill(~dead, -float("inf"))
        v, i = z.topk(8, dim=-1)
        err = x - out["x_hat"]
        err_hat = torch.einsum("bk,bkd->bd", v.relu(), sae.W_dec[i])
        expect = (1 / 32) * min(16 / 8, 1.0) * (err - err_hat).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["aux"].detach(), expect)
    live = SAE.create("topk", d_in=16, d_sae=64, k=4)
    assert "aux" not in live.loss(x)  # nothing dead: no aux term


def test_batchtopk_inference_independent_of_batch():
    torch.manual_seed(0)
    sae = SAE.create("batchtopk", d_in=16, d_sae=64, k=4)
    x = torch.randn(128, 16)
    out = sae.loss(x)
    assert int((sae.dense_codes(out) != 0).sum()) == 4 * 128
    sae.after_step(out, 0)
    sae.eval()
    torch.testing.assert_close(sae.encode(x)[:5], sae.encode(x[:5]))


def test_gated_loss_by_hand_and_where_each_term_sends_its_gradient():
    """The gated loss, by hand: f = 1[π_gate > 0]·ReLU(π_mag), π_gate = (x − b_dec)W_enc + b_gate, π_mag =
    exp(r_mag)·(x − b_dec)W_enc + b_mag; λ‖ReLU(π_gate)‖₁; the aux reconstruction of x from ReLU(π_gate) through
    the frozen decoder. The gradients go where the paper sends them: the L1 and aux terms never reach W_dec (nor the
    magnitudes), the reconstruction never reaches b_gate (the indicator passes no gradient); encode gives f."""
    torch.manual_seed(0)
    sae = SAE.create("gated", d_in=16, d_sae=64, k=4, l1_coeff=0.3)
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec, sae.r_mag, sae.b_mag):
            p.normal_(0, 0.3)
    x = torch.randn(40, 16)
    out = sae.loss(x, step=10**6)  # past the warm-up: λ = 0.3
    with torch.no_grad():
        xc = x - sae.b_dec
        gate = xc @ sae.W_enc + sae.b_enc
        mag = sae.r_mag.exp() * (xc @ sae.W_enc) + sae.b_mag
        f = (gate > 0).float() * mag.relu()
        expect = {"mse": (x - f @ sae.W_dec - sae.b_dec).pow(2).sum(-1).mean(),
                  "l1": 0.3 * gate.relu().sum(-1).mean(),
                  "aux": (x - gate.relu() @ sae.W_dec - sae.b_dec).pow(2).sum(-1).mean()}
    assert ((gate > 0) & (mag <= 0)).any() and ((gate <= 0) & (mag > 0)).any()  # both conditions cut somewhere
    for term, val in expect.items():
        torch.testing.assert_close(out[term].detach(), val, msg=term)
    torch.testing.assert_close(out["loss"].detach(), sum(expect.values()))
    torch.testing.assert_close(sae.dense_codes(out), f)
    torch.testing.assert_close(sae.encode(x), f)
    params = dict(sae.named_parameters())

    def grads(term):
        g = torch.autograd.grad(out[term], list(params.values()), retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(p) if gi is None else gi for (n, p), gi in zip(params.items(), g)}

    def zero(g):
        return bool((g.abs() < 1e-6).all())

    for term in ("l1", "aux"):
        g = grads(term)
        assert all(zero(g[n]) for n in ("W_dec", "r_mag", "b_mag")), term
        assert not zero(g["W_enc"]) and not zero(g["b_enc"]), term
    g = grads("mse")
    assert zero(g["b_enc"])
    assert not any(zero(g[n]) for n in ("W_enc", "W_dec", "b_dec", "r_mag", "b_mag"))


def test_gated_weights_carry_saelens_names_and_a_file_without_r_mag_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    SAE.create("gated", d_in=8, d_sae=32, k=2).save(tmp_path)
    w = load_file(tmp_path / "sae_weights.safetensors")
    assert sorted(w) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]  # SAELens's gated SAE has no b_enc
    del w["r_mag"]
    save_file(w, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SaelabError, match=r"sae_weights\.safetensors lacks r_mag: not a gated SAE weights file"):
        SAE.load(tmp_path)
    w["r_mag"] = torch.zeros(31)
    save_file(w, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SaelabError, match=r"r_mag has shape \(31,\) but d_in 8 and d_sae 32 need \(32,\)"):
        SAE.load(tmp_path)


def test_select_signed_and_unsigned():
    z = torch.tensor([[0.5, -3.0, 2.0, -0.1]])
    v, i = select(z, 2)
    assert i.tolist() == [[2, 0]] and v.tolist() == [[2.0, 0.5]]
    v, i = select(z, 2, signed=True)
    assert i.tolist() == [[1, 2]] and v.tolist() == [[-3.0, 2.0]]


def test_matryoshka_modes():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    pre = SAE.create("matryoshka", d_in=16, d_sae=64, k=8)
    assert pre.prefixes() == [16, 32, 64]
    assert {k for k in pre.loss(x) if k.startswith("mse_")} == {"mse_16", "mse_32", "mse_64"}
    nk = SAE.create("matryoshka", d_in=16, d_sae=64, k=8, matryoshka_mode="k", matryoshka_ks=[2, 4, 8],
                    matryoshka_weighting="reverse")
    out = nk.loss(x)
    assert {k for k in out if k.startswith("mse_")} == {"mse_k2", "mse_k4", "mse_k8"}
    assert int((nk.encode(x) != 0).sum(-1).max()) == 8


def test_fold_input_scale_preserves_codes():
    torch.manual_seed(0)
    for arch in ["topk", "jumprelu", "relu", "abstopk", "gated"]:
        sae = SAE.create(arch, d_in=16, d_sae=64, k=4)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(0, 0.1)
            if arch == "gated":  # the magnitude path's own scale and bias stay as they are
                sae.r_mag.normal_(0, 0.3)
                sae.b_mag.normal_(0, 0.1)
        x = torch.randn(20, 16)
        s = 3.7
        f_scaled = sae.encode(x * s)
        rec_scaled = sae.decode(f_scaled)
        sae.fold_input_scale(s)
        torch.testing.assert_close(sae.encode(x), f_scaled, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae(x), rec_scaled / s, rtol=1e-4, atol=1e-5)


def test_topk_family_fused_loss_equals_dense():
    """The fused path (chunked encode + sparse decode + dead-only aux) gives the dense loss and grads."""
    for arch in ["topk", "abstopk"]:
        res = []
        for kernel in ["reference", "chunked"]:
            torch.manual_seed(0)
            sae = SAE.create(arch, d_in=24, d_sae=300, k=6)
            sae.kernel = kernel
            sae.tokens_since_fired[:40] = 10**9  # some dead latents: aux-k active
            x = torch.randn(50, 24)
            out = sae.loss(x)
            out["loss"].backward()
            res.append((out["loss"].detach(), out["aux"].detach(), sae.W_enc.grad, sae.W_dec.grad, sae.b_dec.grad))
            sae.after_step(out, 0)
            assert int((sae.tokens_since_fired == 0).sum()) > 0
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_encoder_init_scale_by_family_and_flag():
    import pytest

    from saelab.errors import SaelabError

    for arch, scale in [("topk", 0.3), ("abstopk", 0.3), ("matryoshka", 0.3), ("relu", 1.0), ("jumprelu", 1.0),
                        ("batchtopk", 1.0), ("gated", 1.0)]:
        sae = SAE.create(arch, d_in=16, d_sae=64, k=4)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
        torch.testing.assert_close(sae.W_enc, scale * sae.W_dec.t(), msg=arch)
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4, enc_init=0.5)
    torch.testing.assert_close(sae.W_enc, 0.5 * sae.W_dec.t())
    with pytest.raises(SaelabError, match="--enc-init"):
        SAE.create("topk", d_in=16, d_sae=64, k=4, enc_init=0.0)


def test_wrong_input_width_is_a_saelab_error_on_every_encode_path():
    """x [B, d_in ± 1] → SaelabError naming d_in and the hook (dense encode, the fused/chunked/screened
    training paths, the evaluator's sparse codes, topk_encode itself), never a raw matmul RuntimeError."""
    import pytest

    from saelab.errors import SaelabError
    from saelab.evaluate import sparse_codes
    from saelab.kernels import topk_encode

    x = torch.randn(5, 17)
    for arch in ARCHS:
        sae = SAE.create(arch, d_in=16, d_sae=64, k=4, hook_name="blocks.0.hook_resid_post")
        loss = lambda x, sae=sae: sae.loss(x, grads=torch.randn_like(x))  # noqa: E731 (g-SAE needs grads)
        for call in (sae.encode, sae, loss):
            with pytest.raises(SaelabError, match=r"hook blocks\.0\.hook_resid_post with d_in 16.*last dimension 17"):
                call(x)
        for kernel in ["chunked", "screened"]:
            sae.kernel = kernel
            with pytest.raises(SaelabError, match="d_in 16"):
                loss(x)
            if arch in ("topk", "abstopk", "matryoshka"):
                with pytest.raises(SaelabError, match="d_in 16"):
                    sparse_codes(sae, x, kernel)
    with pytest.raises(SaelabError, match="d_in 16"):
        topk_encode(x, torch.randn(16, 64), torch.zeros(64), 4)
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4)
    with pytest.raises(SaelabError, match="this SAE reads its hook with d_in 16"):  # no hook recorded
        sae.encode(torch.randn(3, 15))
    assert sae.encode(torch.randn(3, 16)).shape == (3, 64)


def test_encode_decode_forward_take_batch_by_position_activations():
    """What a hook gives ([batch, pos, d_in]) encodes, decodes and reconstructs like its rows
    flattened, for every architecture (the TopK family's scatter once assumed [B, d_in]); a float64
    input encodes as its float32 copy (it used to be a matmul dtype error)."""
    x = torch.randn(3, 7, 16)
    for arch in ARCHS:
        sae = SAE.create(arch, d_in=16, d_sae=64, k=4).eval()
        f = sae.encode(x)
        assert f.shape == (3, 7, 64), arch
        torch.testing.assert_close(f, sae.encode(x.reshape(-1, 16)).reshape(3, 7, 64), rtol=1e-6, atol=1e-6)
        assert sae.decode(f).shape == sae(x).shape == (3, 7, 16), arch
        torch.testing.assert_close(sae(x), sae(x.reshape(-1, 16)).reshape(3, 7, 16), rtol=1e-5, atol=1e-6)
        f64 = sae.encode(x.double())  # numpy's float64 (and half) inputs are taken in the SAE's dtype
        assert f64.dtype == torch.float32
        torch.testing.assert_close(f64, f, rtol=0, atol=0)


def test_decode_casts_float64_codes_and_rejects_a_wrong_width():
    """decode takes codes in another dtype (float64 from numpy) as the SAE's dtype and gives a
    one-line SaelabError for a wrong width (both were raw matmul errors)."""
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4).eval()
    f = sae.encode(torch.randn(2, 5, 16))
    out = sae.decode(f.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sae.decode(f), rtol=0, atol=0)
    with pytest.raises(SaelabError, match="d_sae 64 latents.*last dimension 16"):
        sae.decode(torch.randn(3, 16))


def test_encode_decode_take_numpy_arrays_and_lists():
    """sae.encode / decode / forward take a numpy array (float64 by default) or a nested list as the
    tensor it holds (they were AttributeError 'numpy.ndarray' object has no attribute 'to')."""
    import numpy as np

    sae = SAE.create("relu", d_in=16, d_sae=64).eval()
    x = np.random.default_rng(0).standard_normal((3, 16))
    ref = sae.encode(torch.tensor(x, dtype=torch.float32))
    torch.testing.assert_close(sae.encode(x), ref)
    torch.testing.assert_close(sae.encode(x.tolist()), ref)
    torch.testing.assert_close(sae.decode(ref.detach().numpy().astype(np.float64)), sae.decode(ref))
    torch.testing.assert_close(sae(x), sae(torch.tensor(x, dtype=torch.float32)))


def test_input_on_another_device_is_one_line():
    """x on another device than the SAE (a GPU model's cache with an SAE left on the CPU) is a
    one-line SaelabError naming sae.to(...) (was the matmul's device error); "meta" stands in for
    a second device on a CPU-only machine."""
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4)
    with pytest.raises(SaelabError, match=r"the input is on meta but this SAE is on cpu: .*sae.to\('meta'\)"):
        sae.encode(torch.zeros(2, 16, device="meta"))


def test_hook_z_activations_with_a_heads_dimension_name_the_flatten():
    """An attn.hook_z activation [batch, pos, n_heads, d_head] given to an SAE trained on the flattened
    heads names x.flatten(-2) (the message said only "last dimension 8")."""
    sae = SAE.create("topk", d_in=32, d_sae=64, k=4, hook_name="blocks.0.attn.hook_z")
    x = torch.randn(2, 5, 4, 8)
    with pytest.raises(SaelabError, match=r"heads × d_head.*x\.flatten\(-2\)"):
        sae.encode(x)
    assert sae.encode(x.flatten(-2)).shape == (2, 5, 64)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu", "batchtopk", "gated"])
def test_load_builds_from_the_weights_without_a_random_init(arch, tmp_path, monkeypatch):
    """SAE.load hands the file's tensors to SAE.from_weights: no random init of W_enc / W_dec (it would cost as much
    as the load), every saved tensor back exactly, the training counters zero, and the SAE trains on."""
    sae = SAE.create(arch, d_in=24, d_sae=96, k=6, hook_name="blocks.0.hook_resid_post", model_name="tiny")
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)  # as estimated in training (an untrained one's -1 is saved as 0)
        if arch == "gated":  # zeros at init: random, so a lost or swapped vector shows
            sae.r_mag.normal_(0, 0.3)
            sae.b_mag.normal_()
    sae.save(tmp_path)

    def no_randn(*a, **kw):
        raise AssertionError("SAE.load ran a random init")

    monkeypatch.setattr(torch, "randn", no_randn)
    back = SAE.load(tmp_path)
    monkeypatch.undo()
    assert type(back) is type(sae) and back.apply_b_dec_to_input
    for name, t in sae.state_dict().items():
        if name != "tokens_since_fired":
            torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=0, msg=name)
    assert back.tokens_since_fired.eq(0).all()
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in back.parameters())
    out = back.loss(torch.randn(32, 24))  # trainable: gradients reach the loaded parameters
    out["loss"].backward()
    assert back.W_enc.grad is not None and back.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("case,needle", [
    ("width", "W_enc has shape (24, 96) but d_in 24 and d_sae 64 need (24, 64); the files do not belong together"),
    ("no b_dec", "lacks b_dec: not a topk SAE weights file"),
])
def test_load_of_mismatched_files_is_one_line(case, needle, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    SAE.create("topk", d_in=24, d_sae=96, k=6).save(tmp_path)
    if case == "width":  # cfg.json of another width than the weights
        cfg = json.loads((tmp_path / "cfg.json").read_text())
        cfg["saelab"]["width"] = cfg["d_sae"] = 64
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    else:
        w = load_file(tmp_path / "sae_weights.safetensors")
        del w["b_dec"]
        save_file(w, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SaelabError) as e:
        SAE.load(tmp_path)
    assert needle in str(e.value) and str(tmp_path / "sae_weights.safetensors") in str(e.value), str(e.value)


@pytest.mark.parametrize("where", ["top", "saelab"])
@pytest.mark.parametrize("field,value", [("d_sae", 192), ("d_in", 12)])
def test_load_refuses_a_cfg_whose_stated_size_is_not_the_weights(where, field, value, tmp_path):
    """A cfg.json stating another d_sae or d_in (top level or in its saelab block) than the weights hold is one
    line naming the field: readers of cfg.json alone (a feature database's width) would disagree with the SAE."""
    import json

    SAE.create("topk", d_in=24, d_sae=96, k=6).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (cfg if where == "top" else cfg["saelab"])[field] = value
    if where == "saelab" and field == "d_in":  # the block's d_in builds the config: from_weights's shape check
        needle = "the files do not belong together"
    else:
        needle = f"cfg.json: {'saelab.' if where == 'saelab' else ''}{field} is {value} but the weights"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaelabError) as e:
        SAE.load(tmp_path)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_load_of_a_thresholded_sae_without_its_threshold_is_one_line(arch, tmp_path):
    """The threshold is a weight jumprelu and batchtopk need: a file without it was loaded with the init's
    threshold (other codes, FVU 3.5 for 0.09); now one line naming the file and the tensor."""
    from safetensors.torch import load_file, save_file

    SAE.create(arch, d_in=8, d_sae=32, k=2).save(tmp_path)
    w = load_file(tmp_path / "sae_weights.safetensors")
    assert w["threshold"].shape == (32,)
    del w["threshold"]
    save_file(w, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SaelabError) as e:
        SAE.load(tmp_path)
    assert f"sae_weights.safetensors lacks threshold: not a {arch} SAE weights file" in str(e.value), str(e.value)


@pytest.mark.parametrize("case,needle", [
    ("truncated", "sae_weights.safetensors is not a readable safetensors file (Error while deserializing header"),
    ("empty", "sae_weights.safetensors is not a readable safetensors file"),
    ("arch", "cfg.json is not a valid SAE config: saelab.arch: 'banana' is not one of ['relu'"),
    ("saelab null", "cfg.json is not a valid SAE config: saelab: None is not an object"),
    ("no d_in", "cfg.json is not a valid SAE config: the top level: 'd_in' is a required property"),
    ("d_in text", "cfg.json is not a valid SAE config: d_in: 'x' is not a whole number"),
])
def test_load_of_a_damaged_folder_is_one_line(case, needle, tmp_path):
    """Damaged weights or cfg.json: one SaelabError naming the file, from SAE.load and from read_sae_cfg (which
    analyze and export read first); they were safetensors/KeyError/AttributeError tracebacks."""
    import json

    from saelab.layout import read_sae_cfg

    SAE.create("topk", d_in=24, d_sae=96, k=6).save(tmp_path)
    weights, cfg_path = tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "empty":
        weights.write_bytes(b"")
    elif case == "arch":
        cfg["saelab"]["arch"] = "banana"
    elif case == "saelab null":
        cfg["saelab"] = None
    else:
        cfg.pop("d_in")
        cfg["saelab"].pop("d_in")
        if case == "d_in text":
            cfg["d_in"] = "x"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SaelabError) as e:
        SAE.load(tmp_path)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    if case not in ("truncated", "empty"):
        with pytest.raises(SaelabError, match="re-save the SAE"):
            read_sae_cfg(tmp_path)


def test_saved_files_share_one_mode(tmp_path):
    """sae_weights.safetensors gets the same permissions as cfg.json (the umask's; safetensors made it 0600,
    unreadable to a group sharing the runs folder)."""
    import stat

    SAE.create("topk", d_in=8, d_sae=16, k=2).save(tmp_path)
    modes = {f: stat.S_IMODE((tmp_path / f).stat().st_mode) for f in ("cfg.json", "sae_weights.safetensors")}
    assert modes["cfg.json"] == modes["sae_weights.safetensors"], modes


def test_top_level_names_import_lazily():
    """`from saelab import SAE` (and ActivationStore, FeatureDB, load_model) works as the README shows, and
    `import saelab` alone does not import torch (the CLI's --help stays fast)."""
    import subprocess
    import sys

    code = ("import sys, saelab; assert 'torch' not in sys.modules, 'import saelab pulled in torch'\n"
            "from saelab import SAE, ActivationStore, FeatureDB, load_model\n"
            "import saelab.sae, saelab.store\n"
            "assert SAE is saelab.sae.SAE and ActivationStore is saelab.store.ActivationStore\n"
            "try:\n    saelab.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
