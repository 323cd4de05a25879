"""The archetypal SAE (saelab.sae.archetypal): its atoms stay in the relaxed hull of its points after every step,
its fused training path equals the plain dense one (loss and gradients of A, Λ and m), it saves as a TopK SAE of
its dictionary, and the CLI refuses a sample larger than the store; planted-feature recovery is in
tests/test_train.py (test_planted_features_recovered)."""

import json

import pytest
import torch

from saelab.sae import SAE
from tests.test_outputs import _fails


def _sae(points=64, width=48, d=16, delta=0.5, seed=0):
    torch.manual_seed(seed)
    sae = SAE.create("archetypal", d_in=d, width=width, k=4, archetypal_points=points, archetypal_delta=delta)
    sae.init_from_rows(torch.randn(points, d) * 3)
    return sae


def test_atoms_start_on_points_and_stay_in_the_relaxed_hull():
    """At the start every atom is one of the points (distinct ones while there are enough); after Adam steps on
    fresh rows A is row-stochastic and non-negative, each row of Λ has norm ≤ δ, and W_dec is exp(m)·(A C + Λ)."""
    sae = _sae()
    dists = (sae.W_dec[:, None] - sae.points[None]).norm(dim=-1)
    assert torch.allclose(dists.min(1).values, torch.zeros(48), atol=1e-5)
    assert len(set(dists.argmin(1).tolist())) == 48
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        out = sae.loss(torch.randn(256, 16, generator=g) * 3, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sae.after_step(out, step)
    assert (sae.mix >= 0).all() and torch.allclose(sae.mix.sum(1), torch.ones(48), atol=1e-5)
    assert (sae.relax.norm(dim=1) <= 0.5 + 1e-5).all() and sae.relax.norm(dim=1).max() > 0
    want = sae.log_scale.exp() * (sae.mix @ sae.points + sae.relax)
    assert torch.allclose(sae.W_dec, want, atol=1e-5) and not sae.W_dec.requires_grad
    assert float(sae.log_scale.detach()) != 0.0  # m is learned


def test_fused_and_dense_paths_give_one_loss_and_gradient():
    """The TopK kernels read W_dec = D built from A, Λ and m: the fused path's loss and the gradients of A, Λ, m,
    W_enc and b_enc equal the plain dense path's on fresh rows (1e-5 relative; aux-k active: every latent dead)."""
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(2)) * 3
    grads = {}
    for kernel in ("reference", "chunked"):
        sae = _sae(seed=3)
        sae.tokens_since_fired.fill_(sae.dead_after)  # aux-k on
        sae.kernel = kernel
        out = sae.loss(x)
        out["loss"].backward()
        grads[kernel] = (float(out["loss"].detach()), {n: p.grad.clone() for n, p in sae.named_parameters()})
    (la, ga), (lb, gb) = grads["reference"], grads["chunked"]
    assert la == pytest.approx(lb, rel=1e-5)
    assert set(ga) == {"W_enc", "b_enc", "b_dec", "mix", "relax", "log_scale"}
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-5 * float(ga[n].abs().max())), n


def test_saved_as_topk_of_its_dictionary(tmp_path):
    sae = _sae()
    folder = sae.save(tmp_path / "a")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["saelab"]["arch"] == "archetypal"
    back = SAE.load(folder)
    x = torch.randn(32, 16) * 3
    assert back.arch == "archetypal" and torch.equal(back.W_dec, sae.W_dec)
    assert torch.allclose(back(x), sae(x), atol=1e-6)


def test_a_sample_larger_than_the_store_is_one_line(tmp_path, capsys):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "s"), d=16, n_true=32, active=2, rows=4096),
                            progress=False)
    _fails(["train", "--activations", store, "--out", tmp_path / "o", "--arch", "archetypal", "--archetypal-points",
            "100000", "--quiet"], capsys, "lower --archetypal-points")
    _fails(["train", "--activations", store, "--out", tmp_path / "o", "--arch", "topk", "--archetypal-points", "64",
            "--quiet"], capsys, "--archetypal-points")
    assert not (tmp_path / "o").exists()
