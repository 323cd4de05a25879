"""The sparse training paths (``saelab.kernels.sparse_codes``) against the plain dense ones (``--kernel reference``).

Every architecture with a sparse step is run on fresh random inputs both ways from the same weights: the loss and
each of its terms, the codes, the gradient of every parameter and the statistics after the step (firing counters,
thresholds, the L0 controller) must agree. Tolerances: fp32 sums in another order, rtol 1e-5 / atol 1e-5 on losses
and gradients (relative to each gradient's largest entry), exact on codes' supports.
"""

from __future__ import annotations

import copy

import pytest
import torch

from saelab.kernels.sparse_codes import batch_top, floor_encode
from saelab.kernels.sparse_decode import sparse_decode
from saelab.sae import SAE
from saelab.sae.choice import mutual_choice

D, N, B = 24, 192, 257  # an odd batch: blocks and offsets that do not divide evenly


def _sparse_state(sae: SAE, seed: int) -> SAE:
    """Weights where few latents fire (≈ 4% of the entries: a trained SAE's sparsity, under MAX_DENSITY)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.3 - 3.2)
        if hasattr(sae, "r_mag"):
            sae.r_mag.copy_(torch.randn(N, generator=g) * 0.2)
            sae.b_mag.copy_(torch.randn(N, generator=g) * 0.3)
        if hasattr(sae, "log_threshold"):  # b_enc near zero, θ spread: entries above, below and inside the window
            sae.b_enc.zero_()
            sae.log_threshold.copy_((torch.rand(N, generator=g) * 0.8 + 2.8).log())
    return sae


def _run(sae: SAE, kernel: str, x, grads=None, **loss_kw):
    sae = copy.deepcopy(sae)
    sae.kernel = kernel
    out = sae.loss(x, step=7, grads=grads, **loss_kw)
    out["loss"].backward()
    sae.after_step(out, 7)
    return sae, out


def _compare(sae: SAE, x, grads=None, form="sparse", **loss_kw):
    ref, o_ref = _run(sae, "reference", x, grads, **loss_kw)
    got, o_got = _run(sae, "auto", x, grads, **loss_kw)
    assert "f" in o_ref and form in o_got, f"{sae.arch}: the paths compared are dense and {form}"
    terms = [k for k, v in o_ref.items() if k not in ("f", "x_hat") and torch.is_tensor(v)]
    assert set(terms) == {k for k, v in o_got.items() if k not in ("sparse", "codes", "x_hat") and torch.is_tensor(v)}
    for k in terms:
        torch.testing.assert_close(o_got[k].detach(), o_ref[k].detach(), rtol=1e-5, atol=1e-5, msg=k)
    torch.testing.assert_close(o_got["x_hat"], o_ref["x_hat"], rtol=1e-5, atol=1e-5)
    f_ref, f_got = ref.dense_codes(o_ref).detach(), got.dense_codes(o_got)
    assert torch.equal(f_ref != 0, f_got != 0), "the same latents fire"
    torch.testing.assert_close(f_got, f_ref, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        scale = float(p.grad.abs().max()) or 1.0
        torch.testing.assert_close(q.grad / scale, p.grad / scale, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b), c in zip(ref.named_buffers(), got.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)  # counters, thresholds, λ
    return o_got


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated", "panneal"])
@pytest.mark.parametrize("seed", [0, 1])
def test_floor_paths_match_the_dense_reference(arch, seed):
    torch.manual_seed(seed)
    sae = _sparse_state(SAE.create(arch, d_in=D, d_sae=N, k=8), seed)
    sae.total_steps = 20
    x = torch.randn(B, D) * 1.5
    out = _compare(sae, x)
    c = out["sparse"]
    assert 0 < c.active().sum() < 0.1 * B * N
    if arch == "jumprelu":  # entries inside the kernel's window under θ: kept, zero-valued, with θ gradients
        assert (~c.active()).any()


def test_panneal_sparse_path_after_p_changes():
    torch.manual_seed(3)
    sae = _sparse_state(SAE.create("panneal", d_in=D, d_sae=N, k=8, p_start=1.0, p_end=0.3), 3)
    sae.total_steps = 20
    sae.p_index.fill_(3)  # a p < 1: the Lp norm's root and its gradient on the sparse row sums
    assert sae.current_p() < 1
    _compare(sae, torch.randn(B, D) * 1.5)


@pytest.mark.parametrize("arch", ["batchtopk", "mutualchoice", "featurechoice"])
def test_batch_selections_match_the_dense_reference(arch):
    torch.manual_seed(4)
    sae = SAE.create(arch, d_in=D, d_sae=N, k=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(B, D)
    sae.threshold.fill_(float(torch.relu(sae.pre_acts(x)).detach().flatten().topk(3 * B).values[-1]))  # the last batches' cut
    _compare(sae, x)


def test_gradient_sae_sparse_selection_matches_the_dense_reference():
    torch.manual_seed(5)
    sae = SAE.create("gradient", d_in=D, d_sae=N, k=6)
    with torch.no_grad():
        sae.b_dec.normal_()
    _compare(sae, torch.randn(B, D), torch.randn(B, D), form="codes")


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu"])
def test_transcoders_take_the_sparse_path_with_their_targets(act_fn):
    torch.manual_seed(6)
    sae = SAE.create("skip-transcoder", d_in=D, d_out=D + 5, d_sae=N, k=8, act_fn=act_fn)
    _sparse_state(sae, 6)
    with torch.no_grad():
        sae.W_skip.normal_(0, 0.1)
    _compare(sae, torch.randn(B, D) * 1.5, target=torch.randn(B, D + 5))


def test_dense_steps_fall_back_and_agree():
    """At a ReLU SAE's init about half its latents fire: the step runs dense (the same dense codes either way)."""
    torch.manual_seed(7)
    sae = SAE.create("relu", d_in=D, d_sae=N, k=8)
    x = torch.randn(B, D)
    _, out = _run(sae, "auto", x)
    assert "f" in out and (out["f"] != 0).float().mean() > 0.3


def test_floor_encode_keeps_exactly_the_entries_above_the_floor():
    torch.manual_seed(8)
    x, W, b = torch.randn(300, 16), torch.randn(16, 96), torch.randn(96) - 2.5
    floor = torch.rand(96)
    c = floor_encode(x, W, b, floor, max_density=1.0)
    z = x @ W + b
    want = torch.where(z > floor, z, torch.zeros(()))
    torch.testing.assert_close(c.dense(96), want, rtol=1e-5, atol=1e-5)
    assert bool((c.rows[1:] >= c.rows[:-1]).all()), "row order"
    assert torch.equal(c.row_counts(), (want != 0).sum(-1))
    # decode with offsets = the dense product
    Wd = torch.randn(96, 11)
    torch.testing.assert_close(c.decode(Wd), want @ Wd, rtol=1e-5, atol=1e-4)
    assert c.active().float().mean() > 0.1  # more than MAX_DENSITY: by default the caller runs dense
    assert floor_encode(x, W, b, floor) is None  # most entries pass: the caller runs dense


def test_floor_encode_backward_is_the_dense_one():
    torch.manual_seed(9)
    x = torch.randn(70, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(8, 40, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(40, dtype=torch.float64) - 2).requires_grad_()
    w = torch.randn(40, dtype=torch.float64)
    c = floor_encode(x, W, b, 0.0, max_density=1.0)
    (c.values * w[c.cols]).pow(2).sum().backward()
    got = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    z = x @ W + b
    (torch.relu(z) * w).pow(2).sum().backward()
    for g, t in zip(got, (x, W, b)):
        torch.testing.assert_close(g, t.grad)


def test_batch_top_is_the_whole_matrix_selection():
    torch.manual_seed(10)
    x, W, b = torch.randn(64, 12), torch.randn(12, 50), torch.zeros(50)
    z = x @ W
    n = 64 * 3
    cut = float(torch.relu(z).flatten().topk(n).values[-1])
    c = batch_top(floor_encode(x, W, b, 0.5 * cut, max_density=1.0), n)
    torch.testing.assert_close(c.dense(50), mutual_choice(z, n))
    assert bool((c.rows[1:] >= c.rows[:-1]).all()), "row order"
    # a floor above the cut: fewer than n entries, refused (the caller lowers the floor)
    assert batch_top(floor_encode(x, W, b, 1.01 * cut, max_density=1.0), n) is None


def test_batch_selection_lowers_a_floor_above_the_cut():
    """θ far above this batch's cut (rows of very different norms, a moved cut): the floor halves until it is under
    the cut, and the step stays sparse and exact."""
    torch.manual_seed(11)
    sae = SAE.create("batchtopk", d_in=D, d_sae=4 * N, k=2)
    x = torch.randn(B, D)
    x[:3] *= 2.0
    cut = float(torch.relu(sae.pre_acts(x)).detach().flatten().topk(2 * B).values[-1])
    sae.threshold.fill_(2.4 * cut)  # 0.8 × 2.4 = 1.92× the cut: one halving gets under it
    _compare(sae, x)


def test_first_batch_selection_runs_dense():
    sae = SAE.create("batchtopk", d_in=D, d_sae=N, k=2)  # no θ yet
    _, out = _run(sae, "auto", torch.randn(B, D))
    assert "f" in out


def test_sparse_decode_offsets_with_empty_rows():
    W = torch.randn(10, 4)
    vals, cols = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3, 7, 3])
    offsets = torch.tensor([0, 0, 2, 3])  # rows 0 and 3 empty
    out = sparse_decode(vals, cols, W, torch.ones(4), offsets=offsets)
    want = torch.ones(4, 4)
    want[1] += W[3] + 2 * W[7]
    want[2] += -W[3]
    torch.testing.assert_close(out, want)
