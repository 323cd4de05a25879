"""SAELens interop (runs where sae-lens is installed: CI's TL 3.9 environment): SAELens loads
saelab's topk / relu / jumprelu / abstopk / batchtopk / matryoshka / gated / panneal / archetypal / feature and mutual
choice / mp folders and gives the same encode and decode; saelab loads folders SAELens wrote (standard, topk, jumprelu, gated)."""

import pytest
import torch

from saelab.sae import SAE

sae_lens = pytest.importorskip("sae_lens")
pytestmark = pytest.mark.tl3


def _randomize(sae):
    torch.manual_seed(0)
    with torch.no_grad():
        for n in sae.saved_params:  # mp's encoder is its decoder: W_dec and b_dec only
            getattr(sae, n).normal_(0, 0.3)
        if sae.arch == "mp":  # its atoms are unit-norm
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "abstopk", "batchtopk", "matryoshka", "gated", "panneal",
                                  "archetypal", "featurechoice", "mutualchoice", "mp"])
def test_saelens_loads_saelab(arch, tmp_path):
    sae = _randomize(SAE.create(arch, d_in=24, d_sae=96, k=6, hook_name="blocks.0.hook_resid_post", model_name="tiny"))
    if arch == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.copy_(torch.rand(96).mul(0.3).add(0.05).log())
    if arch == "batchtopk":
        sae.threshold.fill_(0.2)
    if arch in ("featurechoice", "mutualchoice"):  # per-latent thresholds, saved as a JumpReLU's
        sae.threshold.copy_(torch.rand(96).mul(0.3).add(0.05) if arch == "featurechoice" else torch.full((96,), 0.2))
    if arch == "gated":  # the magnitude path's scale and bias (zeros at init) differ from the gate's
        with torch.no_grad():
            sae.r_mag.normal_(0, 0.3)
            sae.b_mag.normal_(0, 0.3)
    sae.eval().save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(50, 24)
    f_ours, f_theirs = sae.encode(x), theirs.encode(x)
    torch.testing.assert_close(f_theirs, f_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(f_theirs), sae.decode(f_ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,cfg_cls,extra", [
    ("topk", "TopKSAEConfig", {"k": 5}),
    ("relu", "StandardSAEConfig", {}),
    ("jumprelu", "JumpReLUSAEConfig", {}),
    ("gated", "GatedSAEConfig", {}),
])
def test_saelab_loads_saelens(arch, cfg_cls, extra, tmp_path):
    cfg = getattr(sae_lens, cfg_cls)(d_in=16, d_sae=64, **extra)
    theirs = sae_lens.SAE.from_dict(cfg.to_dict()) if hasattr(sae_lens.SAE, "from_dict") else None
    theirs = sae_lens.SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        if arch == "jumprelu":
            theirs.threshold.copy_(torch.rand(64) * 0.3)
    theirs.save_model(str(tmp_path))
    ours = SAE.load(tmp_path)
    assert ours.arch == arch
    x = torch.randn(40, 16)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5)


def test_saelens_loads_a_converted_gemma_scope_sae(tmp_path):
    """A Gemma Scope params.npz converted by saelab.formats and saved: SAELens reads it (b_dec not subtracted from
    the input) and gives Gemma Scope's own encode, f = ReLU(z)·[z > θ] with z = x W_enc + b_enc."""
    import numpy as np

    from saelab.formats import gemma_scope_sae

    rng = np.random.default_rng(0)
    p = {"W_enc": rng.normal(size=(16, 64)).astype(np.float32) / 4, "W_dec": rng.normal(size=(64, 16)).astype(np.float32),
         "b_enc": rng.normal(size=64).astype(np.float32) / 4, "b_dec": rng.normal(size=16).astype(np.float32),
         "threshold": rng.uniform(0.2, 1.0, size=64).astype(np.float32)}
    np.savez(tmp_path / "params.npz", **p)
    gemma_scope_sae(tmp_path / "params.npz", "google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_7").save(
        tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = rng.normal(size=(40, 16)).astype(np.float32) * 2
    z = x @ p["W_enc"] + p["b_enc"]
    f = np.maximum(z, 0) * (z > p["threshold"])
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x))
        torch.testing.assert_close(f_theirs, torch.from_numpy(f), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(f_theirs), torch.from_numpy(f @ p["W_dec"] + p["b_dec"]), rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("arch,act_fn", [("transcoder", "relu"), ("skip-transcoder", "relu"),
                                         ("transcoder", "jumprelu"), ("skip-transcoder", "jumprelu")])
def test_saelens_loads_saelab_transcoders_and_saelab_loads_them_back(arch, act_fn, tmp_path):
    """SAELens's transcoder classes read saelab's files (d_out ≠ d_in, W_skip [d_out, d_in]) and give the same codes
    and outputs; saelab reads the folder SAELens then saves."""
    torch.manual_seed(0)
    ours = SAE.create(arch, d_in=24, d_sae=96, k=6, d_out=20, act_fn=act_fn, hook_name="blocks.0.ln2.hook_normalized",
                      hook_name_out="blocks.0.hook_mlp_out", model_name="tiny")
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        if act_fn == "jumprelu":
            ours.log_threshold.copy_(torch.rand(96).mul(0.3).add(0.05).log())
    ours.eval().save(tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
    assert type(theirs).__name__ == {"relu": "", "jumprelu": "JumpReLU"}[act_fn] + \
        {"transcoder": "Transcoder", "skip-transcoder": "SkipTranscoder"}[arch]
    x = torch.randn(50, 24)
    torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    theirs.save_model(str(tmp_path / "theirs"))
    back = SAE.load(tmp_path / "theirs")
    assert back.cfg.arch == arch and back.cfg.act_fn == act_fn and back.cfg.d_out == 20
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)
