"""Sparse codes of the ReLU family's training paths: the entries of z = x W_enc + b_enc above a per-latent floor, as
rows of a CSR-like list (``SparseCodes``), with a backward that touches those entries only.

After a threshold (ReLU: z > 0; JumpReLU: z > θ; a gate: z > 0) or a batch-wide selection, an SAE's codes hold
≈ L0 of d_sae entries per row. ``floor_encode`` computes z in blocks of rows (one ``addmm`` each, never the whole
[B, d_sae] at once), keeps each block's entries above ``floor`` and returns them with their row and latent, in row
order (so each row's entries are contiguous: ``offsets``). Its backward is the TopK encode's
(``encode_grads``): dW_enc = xᵀ·S and db_enc = Σ S over the sparse [B, d_sae] matrix S of the entries' gradients,
so neither direction forms a dense [B, d_sae] tensor. ``decode`` is ``sparse_decode`` over variable-length rows
(one ``embedding_bag`` with offsets). ``batch_top`` keeps the n largest of such entries: a batch-wide selection
(BatchTopK, Mutual Choice) is exact from any floor under its cut.

A path that keeps too many entries (a ReLU SAE at its start keeps about half of them) is slower sparse than dense:
``floor_encode`` returns None as soon as the kept entries pass ``max_density`` of the matrix, and the architecture
takes its dense path for that step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from saelab.kernels.sparse_decode import half_in_fp32, sparse_decode

#: the kept fraction of [B, d_sae] above which a step runs dense (the sparse backward's cost per entry is ~d_in
#: multiply-adds with scattered reads, against the dense GEMMs' ~d_in per entry in cache: it loses well before half)
MAX_DENSITY = 1 / 16
#: pre-activation entries per block of rows (16 MiB of fp32): big enough for one efficient GEMM, small enough to stay
#: out of the allocator's fresh-mmap path
BLOCK_ENTRIES = 1 << 22


class SparseCodes(NamedTuple):
    """Codes of ``n_rows`` rows as (``rows``, ``cols``, ``values``) [nnz] in row order, ``offsets`` [n_rows] the
    position of each row's first entry. ``values`` may hold zeros (a JumpReLU entry inside its kernel's window but
    under θ): only nonzero values are active latents."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    n_rows: int

    def with_values(self, values: torch.Tensor) -> "SparseCodes":
        return self._replace(values=values)

    def detach(self) -> "SparseCodes":
        return self._replace(values=self.values.detach())

    def active(self) -> torch.Tensor:
        return self.values != 0

    def fired(self, d_sae: int) -> torch.Tensor:
        """[d_sae] bool: the latents with a nonzero value in some row."""
        out = torch.zeros(d_sae, dtype=torch.bool, device=self.cols.device)
        out[self.cols[self.active()]] = True
        return out

    def row_counts(self) -> torch.Tensor:
        """[n_rows] active latents per row."""
        return torch.zeros(self.n_rows, dtype=torch.long, device=self.rows.device).index_add_(
            0, self.rows, self.active().long())

    def row_sums(self, v: torch.Tensor) -> torch.Tensor:
        """[n_rows] Σ of the per-entry ``v`` [nnz] over each row (differentiable in v)."""
        return v.new_zeros(self.n_rows).index_add(0, self.rows, v)

    def dense(self, d_sae: int) -> torch.Tensor:
        """[n_rows, d_sae] codes (the reference the tests compare with; the training paths never form it)."""
        out = self.values.new_zeros(self.n_rows, d_sae)
        out[self.rows, self.cols] = self.values
        return out

    def decode(self, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
        """x̂ [n_rows, d_out] = Σ values · W_dec[cols] per row (+ b_dec), by ``sparse_decode``."""
        return sparse_decode(self.values, self.cols, W_dec, b_dec, offsets=self.offsets)


def from_entries(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int) -> SparseCodes:
    """SparseCodes of entries already in row order (rows non-decreasing)."""
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = counts.cumsum(0) - counts
    return SparseCodes(rows, cols, values, offsets, n_rows)


def encode_grads(needs, x, W_enc, rows, cols, dz):
    """(dx, dW_enc, db_enc) of entries z[rows, cols] = x[rows]·W_enc[:, cols] + b_enc[cols] whose gradients are dz
    (None where ``needs``, autograd's needs_input_grad for (x, W_enc, b_enc), is False): products with the sparse
    [B, d_sae] matrix of dz, never a dense gradient. Duplicate (row, col) pairs are summed."""
    w_dtype = W_enc.dtype
    if half_in_fp32(W_enc):  # no half sparse.mm on CUDA: the products in fp32, cast back below
        W_enc = W_enc.float()
    dz = dz.to(W_enc.dtype)  # under autocast the values may be bf16; weights stay fp32
    B, n = x.shape[0], W_enc.shape[1]
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), dz, (B, n), check_invariants=False).coalesce()
    dx = dW = db = None
    if needs[0]:
        dx = torch.sparse.mm(S, W_enc.t()).to(x.dtype)
    if needs[1]:
        dW = torch.sparse.mm(S.t(), x.to(W_enc.dtype)).t().to(w_dtype)
    if needs[2]:
        db = torch.zeros(n, dtype=dz.dtype, device=dz.device).index_add_(0, cols, dz).to(w_dtype)
    return dx, dW, db


class _Entries(torch.autograd.Function):
    """z[rows, cols] with the sparse backward of ``encode_grads`` (the entries come from the no-grad forward)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, rows, cols, z):
        ctx.save_for_backward(x, W_enc, rows, cols)
        return z

    @staticmethod
    def backward(ctx, dz):
        x, W_enc, rows, cols = ctx.saved_tensors
        return (*encode_grads(ctx.needs_input_grad, x, W_enc, rows, cols, dz), None, None, None)


def entries(x, W_enc, b_enc, rows, cols, z):
    """The pre-activation entries ``z`` (already computed at (rows, cols)), differentiable in x, W_enc and b_enc by
    the sparse backward."""
    return _Entries.apply(x, W_enc, b_enc, rows, cols, z)


@torch.no_grad()
def _above(x, W_enc, b_enc, floor, max_nnz: int):
    """(rows, cols, z) of the entries of x W_enc + b_enc above ``floor`` ([d_sae] or a scalar), in row order; None
    once more than max_nnz are kept."""
    B, n = x.shape[0], W_enc.shape[1]
    block = max(1, BLOCK_ENTRIES // n)
    dtype = torch.promote_types(x.dtype, W_enc.dtype)
    zbuf = torch.empty(min(block, B) * n, dtype=dtype, device=x.device)
    mbuf = torch.empty(zbuf.numel(), dtype=torch.bool, device=x.device)
    rs, cs, vs, kept = [], [], [], 0
    for r0 in range(0, B, block):
        xb = x[r0:r0 + block]
        rb = xb.shape[0]
        z = torch.addmm(b_enc, xb, W_enc, out=zbuf[:rb * n].view(rb, n))
        mask = torch.gt(z, floor, out=mbuf[:rb * n].view(rb, n))
        r, c = mask.nonzero(as_tuple=True)
        kept += r.numel()
        if kept > max_nnz:
            return None
        rs.append(r + r0)
        cs.append(c)
        vs.append(z[r, c])
    return torch.cat(rs), torch.cat(cs), torch.cat(vs)


def floor_encode(x, W_enc, b_enc, floor, max_density: float = MAX_DENSITY, grad: bool = True) -> SparseCodes | None:
    """SparseCodes of the pre-activation entries z = x W_enc + b_enc with z > ``floor`` (a [d_sae] tensor or a
    number; x already centred), their values z itself, differentiable in x, W_enc and b_enc (the floor is not);
    None when more than ``max_density`` of the [B, d_sae] entries pass (the caller runs dense). Under autocast the
    products run in autocast's dtype, as a dense ``x @ W_enc`` would. ``grad=False``: the values without a backward,
    for a selection that keeps some of them (``entries`` then makes the kept ones differentiable, so the backward
    reads those alone)."""
    dev = x.device.type
    xs, Ws, bs = x, W_enc, b_enc
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        xs, Ws, bs = x.to(dt), W_enc.to(dt), b_enc.to(dt)
    if not torch.is_tensor(floor):
        floor = torch.tensor(float(floor), device=x.device)
    with torch.autocast(dev, enabled=False):
        got = _above(xs, Ws, bs, floor.to(Ws.dtype), int(max_density * x.shape[0] * W_enc.shape[1]))
    if got is None:
        return None
    rows, cols, z = got
    return from_entries(rows, cols, entries(x, W_enc, b_enc, rows, cols, z) if grad else z, x.shape[0])


def batch_top(codes: SparseCodes, n: int) -> SparseCodes | None:
    """The ``n`` largest values of ``codes`` (every entry above some floor, in row order) as SparseCodes, still in
    row order: the n largest entries of the whole matrix whenever the floor is under the n-th largest; None when
    fewer than n entries are there (the floor was not under it). Ties at the cut keep the first rows'."""
    v = codes.values
    if v.numel() < n:
        return None
    vd = v.detach()
    cut = vd.kthvalue(v.numel() - n + 1).values  # the n-th largest
    keep = vd >= cut
    over = int(keep.sum()) - n
    if over > 0:
        keep[((vd == cut) & keep).nonzero().squeeze(1)[-over:]] = False
    idx = keep.nonzero().squeeze(1)
    return from_entries(codes.rows[idx], codes.cols[idx], v[idx], codes.n_rows)
