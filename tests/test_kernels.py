"""Chunked TopK encode and sparse decode against their plain references, on fresh random inputs.

Thresholds: values and gradients rtol 1e-4 / atol 1e-5 (fp32; the chunked GEMMs sum in another
order); indices compared only on rows whose k-th and (k+1)-th pre-activation differ by > 1e-4.
"""

import pytest
import torch

from saelab import SaelabError
from saelab.kernels import sparse_decode, topk_encode, topk_encode_reference
from saelab.kernels.topk_encode import resolve_kernel


def _inputs(seed, B=96, d=48, n=1000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, n, generator=g) / d**0.5
    b = torch.randn(n, generator=g) * 0.1
    return x, W, b


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


@pytest.mark.parametrize("signed", [False, True])
def test_chunked_backward_matches_autograd_of_reference(signed):
    x, W, b = _inputs(3)
    k = 8
    grads = []
    for path in ["reference", "chunked"]:
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


def test_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "chunked"
    monkeypatch.setenv("SAELAB_KERNEL", "reference")
    assert resolve_kernel("auto", cpu) == "reference"
    assert resolve_kernel("chunked", cpu) == "chunked"  # an explicit choice wins over the variable
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
