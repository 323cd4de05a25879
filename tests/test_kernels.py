"""Chunked and Triton TopK encode and sparse decode against their plain references, on fresh
random inputs.

Thresholds: fp32 values rtol 1e-5 (atol 1e-6), gradients rtol 1e-4 / atol 1e-5 (the chunked
GEMMs sum in another order); indices compared as sets only on rows whose k-th and (k+1)-th
scores differ by > 1e-4 (elsewhere every selected score must be ≥ the reference's k-th − 1e-4);
bf16: values within 2 bf16 ulps (rtol 2⁻⁷), the index gap 0.03 (2 ulps at |z| ≈ 2).

The Triton tests (marker ``triton``) run the kernel under ``TRITON_INTERPRET=1`` on CPU tensors.
They skip when triton does not import — unless ``SAELAB_REQUIRE_TRITON=1`` (set by .ci/run),
which turns that skip into a failure so they cannot rot silently.
"""

import importlib
import os
import sys

import pytest
import torch

from saelab.errors import SaelabError
from saelab.kernels import sparse_decode, topk_encode, topk_encode_reference
from saelab.kernels.dispatch import resolve_kernel


def _inputs(seed, B=96, d=48, n=1000, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, n, generator=g) / d**0.5
    b = torch.randn(n, generator=g) * 0.1
    return x.to(dtype), W.to(dtype), b.to(dtype)


@pytest.fixture
def interpreter(monkeypatch):
    """Run Triton kernels in its interpreter on CPU tensors (the module is (re)imported under it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        if os.environ.get("SAELAB_REQUIRE_TRITON") == "1":
            pytest.fail(f"triton does not import ({e}) but SAELAB_REQUIRE_TRITON=1: install the dev extra")
        pytest.skip("triton is not installed")
    name = "saelab.kernels.triton_topk"
    mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    assert "Interpreted" in type(mod._topk_encode_kernel).__name__, "triton_topk was not built for the interpreter"
    yield mod
    sys.modules.pop(name, None)  # the next import outside the interpreter builds the real kernel


def check_against_reference(x, W, b, k, signed, v, i, *, rtol=1e-5, atol=1e-6, gap=1e-4, min_clear=0.5):
    """The checks every path must pass (see the module docstring); scores computed in float64."""
    z = x.double() @ W.double() + b.double()
    score = z.abs() if signed else z
    ranked = score.sort(-1, descending=True).values
    kth = ranked[:, k - 1]
    clear = (ranked[:, k - 1] - ranked[:, k]) > gap
    assert clear.float().mean() > min_clear, "too many near-ties to test anything"
    assert v.shape == i.shape == (x.shape[0], k)
    assert all(len(set(r)) == k for r in i.tolist()), "a latent selected twice"
    mine = score.gather(-1, i)
    assert (mine >= kth[:, None] - gap).all(), "a selected score below the reference's k-th"
    ref_i = score.topk(k, dim=-1).indices
    assert torch.equal(i.sort(-1).values[clear], ref_i.sort(-1).values[clear])
    expect = z.gather(-1, i) if signed else z.gather(-1, i).clamp_min(0)
    torch.testing.assert_close(v.double(), expect, rtol=rtol, atol=atol)
    # best first (matryoshka's k mode takes prefixes)
    s = v.double().abs() if signed else v.double()
    assert (s[:, :-1] >= s[:, 1:] - atol - rtol * s[:, 1:].abs()).all()
    # and the reference's own values agree on the rows that are clear of its own rounding too (it selects on
    # z rounded to the input dtype: in bf16 that moves scores by up to an ulp, 0.016 at |z| 3.5, H200 run)
    ref_clear = (ranked[:, k - 1] - ranked[:, k]) > torch.clamp(2 * rtol * kth.abs(), min=gap)
    vr, ir = topk_encode_reference(x, W, b, k, signed)
    torch.testing.assert_close(v[ref_clear].double().sort(-1).values, vr[ref_clear].double().sort(-1).values,
                               rtol=max(rtol, 1e-5), atol=max(atol, 1e-6))


# (B, d, n, k): B not a multiple of the row block / tile, n not a multiple of the chunk / tile,
# k = 1 and k close to the tile (triton tiles: 32 rows × 64 latents; chunked: 40 rows × 96 latents)
SHAPES = [(70, 40, 300, 1), (70, 40, 300, 7), (33, 24, 130, 60)]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_reference_over_shapes(shape, signed):
    B, d, n, k = shape
    x, W, b = _inputs(hash((shape, signed)) % 1000, B, d, n)
    v, i = topk_encode(x, W, b, k, signed, kernel="chunked", chunk=96, rows=40)
    check_against_reference(x, W, b, k, signed, v, i)


@pytest.mark.parametrize("signed", [False, True])
def test_chunked_bf16(signed):
    x, W, b = _inputs(11, 50, 32, 200, torch.bfloat16)
    v, i = topk_encode(x, W, b, 6, signed, kernel="chunked", chunk=64, rows=16)
    assert v.dtype == torch.bfloat16
    check_against_reference(x, W, b, 6, signed, v, i, rtol=2**-7, atol=1e-2, gap=0.03, min_clear=0.3)
    # fp32 tensors under bf16 autocast: the same as the reference under autocast
    x, W, b = _inputs(11, 50, 32, 200)
    with torch.autocast("cpu", torch.bfloat16):
        v, i = topk_encode(x, W, b, 6, signed, kernel="chunked", chunk=64, rows=16)
    assert v.dtype == torch.bfloat16
    bf = [t.bfloat16() for t in (x, W, b)]  # what autocast feeds the GEMM
    check_against_reference(*bf, 6, signed, v, i, rtol=2**-7, atol=1e-2, gap=0.03, min_clear=0.3)


@pytest.mark.triton
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_over_shapes(interpreter, shape, signed):
    B, d, n, k = shape
    x, W, b = _inputs(hash((shape, signed, 1)) % 1000, B, d, n)
    v, i = topk_encode(x, W, b, k, signed, kernel="triton")
    check_against_reference(x, W, b, k, signed, v, i)
    if k == 7:  # the latent split (several programs per row block, merged by torch.topk) selects the same
        v2, i2 = interpreter.triton_select(x, W, b, k, signed, n_split=3)
        assert torch.equal(i2, i) and torch.equal(v2, v)


@pytest.mark.triton
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signed", [False, True])
def test_triton_threshold_method(interpreter, signed):
    """The threshold method (tile maxima, then every entry above the row's k-th best tile maximum as a
    candidate) equals the reference, with k = 1 too; with one candidate list of only k slots per row nearly
    every row overflows (about k + 2 candidates is typical) and comes from the dense fallback, which must
    select the same; with three programs per row block, three lists per row are merged; ragged B and d_sae
    (not multiples of the 32-row, 64-latent tiles), and a shape that is a multiple (its loads unmasked)."""
    for B, d, n, k in [(64, 32, 1024, 7), (70, 40, 1000, 7), (33, 24, 700, 1)]:
        x, W, b = _inputs(hash((B, signed, 2)) % 1000, B, d, n)
        v, i = interpreter.triton_select(x, W, b, k, signed, method="threshold")
        check_against_reference(x, W, b, k, signed, v if signed else v.clamp_min(0), i)
    vr, ir = interpreter._threshold_select(x, W, b, k, signed, 32, 64, 32, {}, "ieee", cap=k)
    assert torch.equal(ir, i) and torch.equal(vr, v)
    # pass 0 alone (what tune_triton.py times as the bare GEMM): each row's best score per 64-latent tile
    tmax = interpreter._threshold_select(x, W, b, k, signed, 32, 64, 32, {}, "ieee", passes=1)
    z = x @ W + b
    z = torch.nn.functional.pad(z.abs() if signed else z, (0, -z.shape[1] % 64), value=float("-inf"))
    torch.testing.assert_close(tmax, z.view(len(z), -1, 64).amax(-1), rtol=1e-5, atol=1e-5)
    x, W, b = _inputs(5, 70, 40, 1000)
    for n_progs in (1, 3):
        v, i = interpreter._threshold_select(x, W, b, 7, signed, 32, 64, 32, {}, "ieee", cap=7, n_progs=n_progs)
        check_against_reference(x, W, b, 7, signed, v if signed else v.clamp_min(0), i)
    with pytest.raises(ValueError, match="running or threshold"):
        interpreter.triton_select(x, W, b, 7, signed, method="sorted")


@pytest.mark.triton
@pytest.mark.timeout(60)
@pytest.mark.parametrize("signed", [False, True])
def test_triton_bf16_and_backward(interpreter, signed):
    x, W, b = _inputs(12, 40, 32, 200, torch.bfloat16)
    v, i = topk_encode(x, W, b, 5, signed, kernel="triton")
    assert v.dtype == torch.bfloat16
    check_against_reference(x, W, b, 5, signed, v, i, rtol=2**-7, atol=1e-2, gap=0.03, min_clear=0.3)
    # fp32: the backward (shared with the chunked path) equals autograd through the reference
    check_backward_against_reference(*_inputs(13, 40, 32, 200), 5, signed, "triton")


def check_backward_against_reference(x, W, b, k, signed, kernel):
    """The fused path's gradients (x, W_enc, b_enc) equal autograd through the dense reference, for a loss
    that weights each selected value by its latent index (rtol 1e-4, atol 1e-5)."""
    grads = []
    for kern in ["reference", kernel]:
        xs, Ws, bs = (t.clone().requires_grad_(True) for t in (x, W, b))
        v, i = topk_encode(xs, Ws, bs, k, signed, kernel=kern)
        (v * (1 + i.float() / W.shape[1])).sum().backward()
        grads.append((xs.grad, Ws.grad, bs.grad))
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_triton_is_never_picked_on_cpu(monkeypatch):
    monkeypatch.delenv("SAELAB_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernel("auto", torch.device("cpu")) == "chunked"
    with pytest.raises(SaelabError, match="needs CUDA tensors") as e:
        resolve_kernel("triton", torch.device("cpu"))
    assert "\n" not in str(e.value)
    x, W, b = _inputs(0, 4, 8, 16)
    with pytest.raises(SaelabError, match="use --kernel chunked"):
        topk_encode(x, W, b, 2, kernel="triton")
    monkeypatch.setenv("SAELAB_KERNEL", "triton")  # the variable is checked the same way
    with pytest.raises(SaelabError, match="needs CUDA tensors"):
        resolve_kernel("auto", torch.device("cpu"))


def test_gradcheck_float64():
    """The custom Functions' backward (sparse products, index_add, embedding_bag) in float64."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 20, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(20, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    for signed in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, W, b: topk_encode(x, W, b, 3, signed, kernel="chunked", chunk=7, rows=4)[0], (x, W, b))
    idx = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(6)])
    vals = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    Wd = torch.randn(20, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, W, b: sparse_decode(v, idx, W, b), (vals, Wd, bd))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_forward_matches_reference(signed, seed):
    x, W, b = _inputs(seed)
    k = 17
    v_ref, i_ref = topk_encode_reference(x, W, b, k, signed)
    v, i = topk_encode(x, W, b, k, signed, kernel="chunked", chunk=128)  # 1000 = 7×128 + 104
    order_ref, order = i_ref.sort(-1), i.sort(-1)
    z = x @ W + b
    score = (z.abs() if signed else z).sort(-1, descending=True).values
    clear = (score[:, k - 1] - score[:, k]) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(order.values[clear], order_ref.values[clear])
    torch.testing.assert_close(v.gather(-1, order.indices)[clear], v_ref.gather(-1, order_ref.indices)[clear],
                               rtol=1e-4, atol=1e-5)
    assert (v >= 0).all() if not signed else (v < 0).any()


@pytest.mark.parametrize("fused", ["chunked", "screened"])
@pytest.mark.parametrize("signed", [False, True])
def test_chunked_backward_matches_autograd_of_reference(signed, fused):
    x, W, b = _inputs(3)
    k = 8
    grads = []
    for path in ["reference", fused]:
        xs, Ws, bs = (t.clone().requires_grad_(True) for t in (x, W, b))
        v, i = topk_encode(xs, Ws, bs, k, signed, kernel=path, chunk=100)
        up = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
        # weight the upstream gradient by index so a wrong pairing of values and indices shows
        (v * up * (1 + i.float() / 1000)).sum().backward()
        grads.append((xs.grad, Ws.grad, bs.grad))
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_sparse_decode_matches_dense():
    g = torch.Generator().manual_seed(0)
    B, k, n, d = 64, 12, 500, 40
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    vals = torch.randn(B, k, generator=g)
    W, b = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    out = []
    for sparse in [False, True]:
        v, Wd, bd = (t.clone().requires_grad_(True) for t in (vals, W, b))
        if sparse:
            x_hat = sparse_decode(v, idx, Wd, bd)
        else:
            x_hat = torch.zeros(B, n).scatter(1, idx, v) @ Wd + bd
        x_hat.pow(2).sum().backward()
        out.append((x_hat.detach(), v.grad, Wd.grad, bd.grad))
    for a, c in zip(*out):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    used = torch.zeros(n, dtype=torch.bool)
    used[idx.flatten()] = True
    assert torch.all(out[1][2][~used] == 0)  # only used decoder rows get gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_half_upcast(monkeypatch, dtype):
    """The fp32 bag that half-precision decodes use where embedding_bag has no half backward (CUDA):
    forced on the CPU, it gives the same x̂ and gradients as the plain half bag (to half rounding), in
    the parameters' dtype, and both agree with a float64 dense decode."""
    sd = importlib.import_module("saelab.kernels.sparse_decode")  # the package's name is the function

    g = torch.Generator().manual_seed(3)
    B, k, n, d = 48, 8, 300, 32
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    vals, W, b = torch.rand(B, k, generator=g) + 0.5, torch.randn(n, d, generator=g) / 4, torch.randn(d, generator=g)
    up = torch.randn(B, d, generator=g)
    out = {}
    for mode in ["plain", "upcast"]:
        if mode == "upcast":
            monkeypatch.setattr(sd, "NO_HALF_SPARSE_GRAD", {"cpu"})
        v, Wd, bd = (t.to(dtype).requires_grad_(True) for t in (vals, W, b))
        assert sd._upcast(v, Wd) == (mode == "upcast")
        x_hat = sparse_decode(v, idx, Wd, bd)
        assert x_hat.dtype == dtype
        (x_hat.float() * up).sum().backward()
        assert v.grad.dtype == Wd.grad.dtype == dtype
        out[mode] = [t.double() for t in (x_hat.detach(), v.grad, Wd.grad, bd.grad)]
    v64, W64, b64 = (t.to(dtype).double().requires_grad_(True) for t in (vals, W, b))
    x64 = torch.zeros(B, n, dtype=torch.float64).scatter(1, idx, v64) @ W64 + b64
    (x64 * up.double()).sum().backward()
    ref = [x64.detach(), v64.grad, W64.grad, b64.grad]
    tol = dict(rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=0.05 if dtype == torch.bfloat16 else 0.01)
    for a, c, r in zip(out["plain"], out["upcast"], ref):
        torch.testing.assert_close(c, r, **tol)
        torch.testing.assert_close(a, r, **tol)
    with torch.no_grad():  # inference keeps the half bag
        assert not sd._upcast(v.detach(), Wd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_encode_backward_half_fp32_detour(monkeypatch, dtype):
    """The encode's sparse backward for half weights on a device without half sparse.mm (CUDA) runs its
    products in fp32: forced on the CPU, its gradients have the weights' dtype and equal the plain half
    backward's and a float64 autograd reference's on the same selection, to half rounding (the detour's
    fp32 accumulation is the closer of the two)."""
    sd = importlib.import_module("saelab.kernels.sparse_decode")
    x, W, b = _inputs(21, 64, 48, 700)
    up = torch.randn(64, 12, generator=torch.Generator().manual_seed(5))
    grads = {}
    for mode in ["plain", "fp32"]:
        if mode == "fp32":
            monkeypatch.setattr(sd, "NO_HALF_SPARSE_GRAD", {"cpu"})
        xs, Ws, bs = (t.to(dtype).requires_grad_(True) for t in (x, W, b))
        v, i = topk_encode(xs, Ws, bs, 12, False, kernel="chunked", chunk=256)
        (v.float() * up).sum().backward()
        assert xs.grad.dtype == Ws.grad.dtype == bs.grad.dtype == dtype
        grads[mode] = [t.grad.double() for t in (xs, Ws, bs)], i
    x64, W64, b64 = (t.to(dtype).double().requires_grad_(True) for t in (x, W, b))
    i = grads["fp32"][1]
    ((x64 @ W64 + b64).gather(1, i).clamp_min(0) * up.double()).sum().backward()
    tol = dict(rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=0.02 if dtype == torch.bfloat16 else 3e-3)
    assert torch.equal(grads["plain"][1], i)
    for a, c, r in zip(grads["plain"][0], grads["fp32"][0], (x64.grad, W64.grad, b64.grad)):
        torch.testing.assert_close(c, r, **tol)
        # the plain half sparse.mm accumulates in half: up to 3.4x (bf16) / 1.7x (fp16) further off
        torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=4 * tol["atol"])


def test_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "chunked"
    monkeypatch.setenv("SAELAB_KERNEL", "reference")
    assert resolve_kernel("auto", cpu) == "reference"
    assert resolve_kernel("chunked", cpu) == "chunked"  # an explicit choice wins over the variable
    monkeypatch.setenv("SAELAB_KERNEL", "screened")
    assert resolve_kernel("auto", cpu) == "screened"
    assert resolve_kernel("chunked", cpu) == "chunked"
    with pytest.raises(SaelabError, match="choose one of"):
        resolve_kernel("fast", cpu)


def test_chunked_never_allocates_the_full_preactivation():
    """Largest single CPU allocation during forward + backward (torch.profiler): the reference
    needs [B, d_sae]; the chunked path only [B, chunk] and parameter-sized gradients."""
    from torch.profiler import ProfilerActivity, profile

    B, d, n, k = 256, 32, 8192, 8
    x, W, b = _inputs(5, B, d, n)
    W.requires_grad_(True)
    b.requires_grad_(True)
    full = B * n * 4
    largest = {}
    for kernel in ["reference", "chunked"]:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            v, _ = topk_encode(x, W, b, k, kernel=kernel, chunk=512)
            (v * v).sum().backward()
        largest[kernel] = max(e.cpu_memory_usage for e in prof.events())
        W.grad = b.grad = None
    assert largest["reference"] >= full  # the measurement can see a [B, d_sae] tensor
    assert largest["chunked"] <= max(B * 512, d * n) * 4 * 1.1, largest


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("kern") / "store"
    return write_synthetic(SyntheticConfig(out=str(out), d=32, n_true=96, active=4, rows=8192, shard_rows=4096),
                           progress=False)


_TRAINED: dict = {}


@pytest.mark.parametrize("arch, fused", [("topk", "chunked"), ("topk", "screened")])
def test_fused_and_reference_training_end_with_the_same_weights(arch, fused, tiny_store, tmp_path_factory):
    """Same seed, same data, 25 steps: the fused path (chunked or screened encode, sparse decode,
    sparse backward) and the dense reference end within rtol 1e-3 / atol 1e-4 of each other."""
    from saelab.config import SAEConfig, TrainConfig
    from saelab.sae.base import SAE
    from saelab.train import train

    for kernel in ["reference", fused]:
        if (arch, kernel) not in _TRAINED:  # the reference run is shared by both fused paths
            out = tmp_path_factory.mktemp(f"train-{arch}-{kernel}")
            train(TrainConfig(activations=str(tiny_store), out=str(out), tokens=256 * 25, batch_size=256,
                              lr=1e-3, log_every=20, checkpoint_every=1000, kernel=kernel),
                  SAEConfig(arch=arch, k=6, expansion=4), progress=False)
            _TRAINED[arch, kernel] = SAE.load(out)
    a, b = _TRAINED[arch, "reference"], _TRAINED[arch, fused]
    assert (a.W_enc - SAE.create(arch, d_in=32, d_sae=128, k=6).W_enc).abs().max() > 1e-2  # it trained
    for n in ["W_enc", "b_enc", "W_dec", "b_dec"]:
        torch.testing.assert_close(getattr(b, n), getattr(a, n), rtol=1e-3, atol=1e-4)


def test_train_kernel_triton_on_cpu_is_an_error(tiny_store, tmp_path, monkeypatch):
    from saelab.config import SAEConfig, TrainConfig
    from saelab.train import train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SaelabError, match="needs CUDA tensors"):
        train(TrainConfig(activations=str(tiny_store), out=str(tmp_path / "t"), tokens=1024, batch_size=256,
                          kernel="triton", device="cpu"), SAEConfig(arch="topk", k=4, expansion=2), progress=False)


@pytest.mark.parametrize("mode", ["prefix", "k"])
def test_matryoshka_fused_loss_equals_dense(mode):
    """One fused encode + per-prefix sparse decodes give the dense loss, every term, and its grads."""
    from saelab.sae.base import SAE

    res = []
    for kernel in ["reference", "chunked"]:
        torch.manual_seed(0)
        sae = SAE.create("matryoshka", d_in=24, d_sae=300, k=8, matryoshka_mode=mode,
                         matryoshka_weighting="reverse")
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.1)
        sae.kernel = kernel
        sae.tokens_since_fired[:40] = 10**9  # some dead latents: aux-k active
        x = torch.randn(50, 24, generator=torch.Generator().manual_seed(1))
        out = sae.loss(x)
        out["loss"].backward()
        terms = {k: v.detach() for k, v in out.items() if k.startswith(("mse", "aux", "loss"))}
        res.append((terms, [p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]))
    (t_ref, g_ref), (t_fused, g_fused) = res
    assert t_ref.keys() == t_fused.keys() and len([k for k in t_ref if k.startswith("mse")]) == 3
    for key in t_ref:
        torch.testing.assert_close(t_fused[key], t_ref[key], rtol=1e-4, atol=1e-5)
    for a, c in zip(g_ref, g_fused):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- screened
# The bf16-screened path (kernel="screened"): exact fp32 results, checked with the same criteria
# as every path (check_against_reference), on inputs chosen to stress the screen's error bound.

def _screened(x, W, b, k, signed, **kw):
    from saelab.kernels.screened import SCREEN_STATS, screened_select

    z, i = screened_select(x, W, b, k, signed, kw.pop("chunk", 96), kw.pop("rows", 40), **kw)
    return (z if signed else z.clamp_min(0)), i, dict(SCREEN_STATS)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape, scale", [(s, 1.0) for s in SHAPES] + [((130, 64, 1000, 32), 1e-3),
                                                                      ((130, 64, 1000, 32), 1e3)])
def test_screened_matches_reference(shape, signed, scale):
    B, d, n, k = shape
    x, W, b = _inputs(hash((shape, signed, 2)) % 1000, B, d, n)
    x, b = x * scale, b * scale  # scores scale with x (and b): the bound must scale too
    v, i = topk_encode(x, W, b, k, signed, kernel="screened", chunk=96, rows=40)
    tol = dict(gap=1e-4 * scale, atol=1e-6 * scale)
    check_against_reference(x, W, b, k, signed, v, i, **tol)
    from saelab.kernels.screened import SCREEN_STATS
    assert SCREEN_STATS["rows"] == B and SCREEN_STATS["fallback_rows"] == 0
    assert k * B <= SCREEN_STATS["candidates"] < n * B  # it screened something out


@pytest.mark.parametrize("signed", [False, True])
def test_screened_near_ties_the_screen_cannot_separate(signed):
    """Each latent duplicated 4× with relative perturbations of ~1e-3 (below bf16's 2⁻⁸ ≈ 4e-3,
    above the tests' 1e-4 gap): the screen sees ties, the exact rescoring must order them."""
    g = torch.Generator().manual_seed(21)
    B, d, base, k = 64, 48, 60, 10
    x = torch.randn(B, d, generator=g)
    W0 = torch.randn(d, base, generator=g) / d**0.5
    W = torch.cat([W0 * (1 + 1e-3 * j) + 1e-4 * torch.randn(d, base, generator=g) / d**0.5 for j in range(4)], 1)
    b = torch.zeros(4 * base)
    v, i, stats = _screened(x, W, b, k, signed, chunk=70, rows=24)
    check_against_reference(x, W, b, k, signed, v, i, min_clear=0.8)
    assert stats["fallback_rows"] < B // 4  # mostly the screened path, not its fallback


@pytest.mark.parametrize("signed", [False, True])
def test_screened_fallback_rows_are_exact(signed):
    """A candidate cap below what the screen keeps sends those rows to the exact chunked path."""
    x, W, b = _inputs(22, 90, 32, 700)
    v, i, stats = _screened(x, W, b, 8, signed, max_cand=16)
    assert 0 < stats["fallback_rows"] < 90  # some rows fell back, some did not
    check_against_reference(x, W, b, 8, signed, v, i)


@pytest.mark.parametrize("d", [16, 512, 3000])
def test_screen_error_bound_holds(d):
    """The derivation in screened.py, without its safety factor: |s − z| ≤ A_i + ρ|s| for the
    bf16 screen s against the float64 pre-activation z, on every entry (scaled inputs too)."""
    from saelab.kernels.screened import SCREEN_U, _bf16_weights

    g = torch.Generator().manual_seed(d)
    for scale in (1.0, 1e3):
        x = torch.randn(64, d, generator=g) * scale
        x[0] *= 1e-4  # a row of tiny norm next to large ones
        W = torch.randn(d, 256, generator=g) / d**0.5
        W[:, :3] *= 30  # a few columns of large norm
        b = torch.randn(256, generator=g) * scale
        Wq, cw, ce = _bf16_weights(W, 100)
        bq = b.bfloat16()
        s = torch.addmm(bq, x.bfloat16(), Wq).double()
        z = x.double() @ W.double() + b.double()
        u = SCREEN_U
        rho = 2 * u / (1 - u) ** 2
        gam = d * 2.0**-24 / (1 - d * 2.0**-24)
        xq = x.bfloat16().float()
        A = ((x - xq).norm(dim=1) * (cw + ce) + xq.norm(dim=1) * (ce + gam * cw)
             + float((b - bq.float()).abs().max()) + rho * float(bq.float().abs().max())).double()
        err = (s - z).abs()
        assert (err <= A[:, None] + rho * s.abs()).all()
        ratio = (err.amax(1) / A).median()
        assert ratio > 0.4 / d**0.5  # not vacuous: Cauchy–Schwarz is loose by ~√d on random data


def test_screened_sees_weight_updates():
    """The bf16 copy of W_enc is cached per tensor version: an in-place update (as an optimizer
    step does) must be seen, and a fresh tensor must not reuse a stale copy."""
    x, W, b = _inputs(23, 60, 32, 400)
    for _ in range(2):
        v, i = topk_encode(x, W, b, 6, kernel="screened", chunk=96, rows=40)
        check_against_reference(x, W, b, 6, False, v, i)
        with torch.no_grad():
            W.mul_(-1).add_(0.05)
    W2 = torch.randn_like(W)
    v, i = topk_encode(x, W2, b, 6, kernel="screened", chunk=96, rows=40)
    check_against_reference(x, W2, b, 6, False, v, i)


@pytest.mark.parametrize("arch", ["topk", "abstopk", "matryoshka"])
def test_eval_metrics_fused_equal_dense(arch, tiny_store):
    """evaluate_store: FVU, L0, dead and dense fractions through the fused encode + sparse decode
    (chunked, screened) equal the dense reference's within 1e-5."""
    from saelab.evaluate import evaluate_store
    from saelab.sae.base import SAE
    from saelab.store import ActivationStore

    torch.manual_seed(0)
    sae = SAE.create(arch, d_in=32, d_sae=200, k=6)
    with torch.no_grad():
        sae.b_enc.normal_(-1.0, 0.3)  # some picks are negative pre-activations (zero values under ReLU)
        sae.b_dec.normal_(0, 0.1)
    store = ActivationStore(tiny_store)
    ev = {kern: evaluate_store(sae, store, max_rows=3000, batch_size=1024, kernel=kern)
          for kern in ["reference", "chunked", "screened"]}
    assert 0 < ev["reference"]["l0"] <= 6 and ev["reference"]["rows"] > 0
    assert (ev["reference"]["l0"] < 6) == (arch != "abstopk")  # zero-valued picks are not firings
    for kern in ["chunked", "screened"]:
        assert ev[kern].keys() == ev["reference"].keys()
        for key, val in ev["reference"].items():
            if isinstance(val, float):
                assert ev[kern][key] == pytest.approx(val, rel=1e-5, abs=1e-7), (kern, key)
            else:
                assert ev[kern][key] == val


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated", "topk"])
def test_dense_paths_in_row_chunks_equal_one_chunk(arch, tiny_store, monkeypatch):
    """The dense (non-TopK, or --kernel reference) encode runs in row chunks of DENSE_BUDGET // d_sae rows:
    evaluate_store's metrics, reconstruct and analyze's sparse codes are the same with 7 rows per chunk (ragged)
    as with the whole batch in one (floats within 1e-6 relative: float32 GEMMs of other shapes round
    differently), and no encode sees more than 7 rows."""
    import saelab.evaluate as E
    from saelab.analysis.features.codes import sparse_codes
    from saelab.sae.base import SAE
    from saelab.store import ActivationStore

    torch.manual_seed(0)
    sae = SAE.create(arch, d_in=32, d_sae=200, k=6)
    sae.kernel = "reference"  # the TopK SAE takes the dense path too
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3)
    x = torch.randn(100, 32)
    store = ActivationStore(tiny_store)
    whole = {"ev": E.evaluate_store(sae, store, max_rows=3000, batch_size=1024), "rec": E.reconstruct(sae, x),
             "codes": sparse_codes(sae, x)}
    monkeypatch.setattr(E, "DENSE_BUDGET", 7 * 200)
    assert [len(part) for _, part in E.dense_chunks(sae, x)] == [7] * 14 + [2]
    seen, encode = [], sae.encode
    sae.encode = lambda rows: (seen.append(len(rows)), encode(rows))[1]
    chunked = {"ev": E.evaluate_store(sae, store, max_rows=3000, batch_size=1024), "rec": E.reconstruct(sae, x),
               "codes": sparse_codes(sae, x)}
    assert seen and max(seen) == 7
    assert 0 < whole["ev"]["l0"] and len(whole["codes"][0]) > 100
    for key, val in whole["ev"].items():
        assert chunked["ev"][key] == (pytest.approx(val, rel=1e-6) if isinstance(val, float) else val), key
    # within 1e-6 of the largest |x̂|: an entry near 0 is a sum of terms of that size, rounded as they are
    scale = float(whole["rec"].detach().abs().max())
    torch.testing.assert_close(chunked["rec"], whole["rec"], rtol=1e-6, atol=1e-6 * scale)
    assert torch.equal(chunked["codes"][0], whole["codes"][0])
    torch.testing.assert_close(chunked["codes"][1], whole["codes"][1], rtol=1e-6, atol=1e-6)


def test_eval_ce_splice_fused_equals_dense(tiny):
    """evaluate_model: the spliced CE / KL through the fused path equal the dense one within 1e-5."""
    import numpy as np

    from saelab.evaluate import evaluate_model
    from saelab.sae.base import SAE

    torch.manual_seed(1)
    sae = SAE.create("topk", d_in=tiny.cfg.d_model, d_sae=512, k=8, hook_name="blocks.0.hook_resid_post")
    tokens = np.random.default_rng(0).integers(0, tiny.cfg.d_vocab, (4, 24))
    ev = {kern: evaluate_model(sae, tiny, tokens, batch_size=2, kernel=kern) for kern in ["reference", "chunked"]}
    assert abs(ev["reference"]["ce_sae"] - ev["reference"]["ce_clean"]) > 1e-3  # the splice changes the output
    for key, val in ev["reference"].items():
        assert ev["chunked"][key] == pytest.approx(val, rel=1e-5, abs=1e-7), key


def test_auto_picks_screened_only_where_it_pays(monkeypatch):
    """auto → screened on a CPU with native bf16 for fp32 weights of ≥ SCREEN_MIN_WEIGHTS entries
    at ≤ SCREEN_MAX_THREADS threads; an explicit chunked (argument or SAELAB_KERNEL) always wins;
    bf16 tensors stay chunked."""
    # dispatch.auto_screen reads the patched names at call time; screened_select fills SCREEN_STATS
    from saelab.kernels import dispatch, screened

    monkeypatch.delenv("SAELAB_KERNEL", raising=False)
    monkeypatch.setattr(dispatch, "bf16_matmul_fast", lambda: True)
    monkeypatch.setattr(dispatch, "SCREEN_MIN_WEIGHTS", 1000)
    monkeypatch.setattr(dispatch, "SCREEN_MAX_THREADS", torch.get_num_threads())
    x, W, b = _inputs(24, 30, 16, 200)

    def screened_ran(**kw):
        screened.SCREEN_STATS.clear()
        topk_encode(x, W, b, 4, **kw)
        return bool(screened.SCREEN_STATS)

    assert screened_ran()  # auto, 16 × 200 ≥ 1000 weights
    assert not screened_ran(kernel="chunked")
    monkeypatch.setenv("SAELAB_KERNEL", "chunked")
    assert not screened_ran()
    monkeypatch.delenv("SAELAB_KERNEL")
    monkeypatch.setattr(dispatch, "SCREEN_MIN_WEIGHTS", 10**6)
    assert not screened_ran()  # too small to pay
    monkeypatch.setattr(dispatch, "SCREEN_MIN_WEIGHTS", 1000)
    monkeypatch.setattr(dispatch, "SCREEN_MAX_THREADS", torch.get_num_threads() - 1)
    assert not screened_ran()  # more threads than it is timed to win at
    monkeypatch.setattr(dispatch, "SCREEN_MAX_THREADS", torch.get_num_threads())
    monkeypatch.setattr(dispatch, "bf16_matmul_fast", lambda: False)
    assert not screened_ran()  # no native bf16
    screened.SCREEN_STATS.clear()
    topk_encode(x.bfloat16(), W.bfloat16(), b.bfloat16(), 4, kernel="screened")  # named, but not fp32
    assert not screened.SCREEN_STATS
