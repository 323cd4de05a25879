"""The streaming accumulators of the analyze pass: everything kept is sized by d_sae, never by the store.

Per batch, every statistic is a batched tensor op over the batch's sparse (row, latent, value) entries:

* firing count, sum, max and min per latent (``bincount`` / ``index_add`` / ``scatter_reduce``),
  and a histogram of non-zero |activation| over log-spaced bins shared by all latents
  (edges calibrated on the first batch: 0.1 % quantile / 4 … max × 8; values outside go to
  the end bins);
* the top-N examples per latent (and the most negative N for signed, AbsTopK, SAEs) and a
  random sample per (latent, activation band) — all kept in ``TopBuffer``s: the running
  [slots, N] best is concatenated with each batch's candidates grouped per slot and
  re-top-k'd; only entries above a slot's current N-th value are looked at at all;
* each kept example carries its token window and this latent's activation on every token of the
  window, taken from the batch in hand when the example enters the buffer, so no second pass is needed.

Rows at position 0 (BOS, when the store includes it) are left out of every statistic and
example (they appear in windows only). Quantile bands are fractions of the latent's max
|activation| (``N_BANDS`` equal bands); during the pass samples are banded by the running max
and re-banded by the final max at the end, so each example is shown in its true band.
"""

from __future__ import annotations

import math

import torch

from saelab.analysis.features.codes import Batch
from saelab.analysis.features.records import N_BANDS, N_BINS, PER_BAND, RESERVOIR, WINDOW


class TopBuffer:
    """The ``cap`` entries with the largest key per slot, with their example payloads.

    ``offer`` merges a batch's candidates with batched tensor ops: keep those above their slot's
    current cap-th key (``thresh``), order them by (slot, key desc), rank within slot, scatter the
    first ``cap`` of each touched slot into [U, cap], concatenate with the slots' current keys,
    re-top-k. Survivors stay where they are (entries are unordered within a slot until
    ``sorted()``); the newcomers take the evicted places, and only their windows are built."""

    def __init__(self, slots: int, cap: int, device):
        self.cap = cap
        self.key = torch.full((slots, cap), -math.inf, device=device)
        self.thresh = torch.full((slots,), -math.inf, device=device)
        self.val = torch.zeros((slots, cap), device=device)
        self.row = torch.full((slots, cap), -1, dtype=torch.long, device=device)
        self.tok = torch.full((slots, cap, WINDOW), -1, dtype=torch.int32, device=device)
        self.act = torch.zeros((slots, cap, WINDOW), device=device)

    def offer(self, slot, key, val, b, lat, batch: Batch) -> None:
        keep = key > self.thresh[slot]
        if not bool(keep.any()):
            return
        slot, key, val, b, lat = slot[keep], key[keep], val[keep], b[keep], lat[keep]
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(slot[order], stable=True)]
        slot, key, val, b, lat = slot[order], key[order], val[order], b[order], lat[order]
        uniq, counts = torch.unique_consecutive(slot, return_counts=True)
        grp = torch.repeat_interleave(torch.arange(len(uniq), device=slot.device), counts)
        rank = torch.arange(len(slot), device=slot.device) - (torch.cumsum(counts, 0) - counts)[grp]
        m = rank < self.cap
        grp, rank, key, val, b, lat = grp[m], rank[m], key[m], val[m], b[m], lat[m]
        cap, U, dev = self.cap, len(uniq), key.device
        ck = torch.full((U, cap), -math.inf, device=dev)
        ck[grp, rank] = key
        e = torch.full((U, cap), -1, dtype=torch.long, device=dev)
        e[grp, rank] = torch.arange(len(key), device=dev)
        new_key, idx = torch.cat([self.key[uniq], ck], 1).topk(cap, dim=1)
        is_new = (idx >= cap) & (new_key > -math.inf)
        surv = torch.zeros((U, cap + 1), dtype=torch.bool, device=dev)
        surv.scatter_(1, torch.where(idx < cap, idx, cap), True)
        # the newcomers take the free places of their slot (there are as many), row-major order
        free_order = torch.argsort(surv[:, :cap].long(), dim=1, stable=True)  # free places first
        take = torch.arange(cap, device=dev)[None, :] < is_new.sum(1, keepdim=True)
        dst_u, dst_j = take.nonzero(as_tuple=True)
        place = free_order[dst_u, dst_j]
        src_u, src_j = is_new.nonzero(as_tuple=True)
        c = e[src_u, idx[src_u, src_j] - cap]
        s_ = uniq[dst_u]
        self.key[s_, place] = key[c]
        self.val[s_, place] = val[c]
        self.row[s_, place] = batch.r0 + b[c]
        t, a = batch.windows(b[c], lat[c])
        self.tok[s_, place] = t
        self.act[s_, place] = a
        new = self.key[uniq]
        self.thresh[uniq] = torch.where((new == -math.inf).any(1), -math.inf, new.min(1).values)

    def sorted(self):
        """(key, val, row, tok, act) with each slot's entries by key, descending; empties row -1."""
        k, o = self.key.sort(dim=1, descending=True, stable=True)
        o3 = o[..., None].expand(-1, -1, WINDOW)
        row = torch.where(k > -math.inf, self.row.gather(1, o), -1)
        return k, self.val.gather(1, o), row, self.tok.gather(1, o3), self.act.gather(1, o3)


class Accumulator:
    """Everything the pass keeps, sized by d_sae."""

    def __init__(self, d_sae: int, top: int, signed: bool, device, seed: int = 0):
        self.d_sae, self.top, self.signed, self.device = d_sae, top, signed, device
        self.count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.full((d_sae,), -math.inf, device=device)
        self.min = torch.full((d_sae,), math.inf, device=device)
        self.maxabs = torch.zeros(d_sae, device=device)
        self.hist = torch.zeros(d_sae * N_BINS, dtype=torch.long, device=device)
        self.edges: torch.Tensor | None = None
        self.pos = TopBuffer(d_sae, top, device)
        self.neg = TopBuffer(d_sae, top, device) if signed else None
        self.res = TopBuffer(d_sae * N_BANDS, RESERVOIR, device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.rows = 0

    def add(self, batch: Batch, bos: bool) -> None:
        keys, vals = batch.keys, batch.vals
        b, lat = keys // self.d_sae, keys % self.d_sae
        n_rows = batch.n
        if bos:
            counted = (batch.r0 + b) % batch.ctx != 0
            b, lat, vals = b[counted], lat[counted], vals[counted]
            first, end = batch.r0, batch.r0 + batch.n  # BOS rows in [first, end): multiples of ctx
            n_rows -= -(-end // batch.ctx) - -(-first // batch.ctx)
        self.rows += n_rows
        if not len(vals):
            return
        a = vals.abs()
        self.count += torch.bincount(lat, minlength=self.d_sae)
        self.sum.index_add_(0, lat, vals.double())
        self.max.scatter_reduce_(0, lat, vals, "amax")
        self.min.scatter_reduce_(0, lat, vals, "amin")
        self.maxabs.scatter_reduce_(0, lat, a, "amax")
        if self.edges is None:  # log bins from the first batch: 0.1% quantile / 4 .. max × 8
            lo = max(float(torch.quantile(a[: 1 << 20].float(), 1e-3)) / 4, 1e-30)
            hi = float(a.max()) * 8
            self.edges = torch.logspace(math.log10(lo), math.log10(hi), N_BINS + 1, device=a.device)
        bins = torch.bucketize(a, self.edges[1:-1], right=True)
        self.hist += torch.bincount(lat * N_BINS + bins, minlength=self.d_sae * N_BINS)
        pos = vals > 0
        self.pos.offer(lat[pos], vals[pos], vals[pos], b[pos], lat[pos], batch)
        if self.neg is not None:
            neg = vals < 0
            self.neg.offer(lat[neg], -vals[neg], vals[neg], b[neg], lat[neg], batch)
        band = (a / self.maxabs[lat] * N_BANDS).long().clamp(0, N_BANDS - 1)
        u = torch.rand(len(a), generator=self.gen, device=a.device)
        self.res.offer(lat * N_BANDS + band, u, vals, b, lat, batch)

    def quantiles(self):
        """Final bands: the reservoir re-banded by the final max |act|; PER_BAND per band,
        sorted by activation. Returns (rows, vals, tok, act) [d_sae, N_BANDS·PER_BAND, ...]."""
        d, R = self.d_sae, N_BANDS * RESERVOIR
        key = self.res.key.view(d, R)
        val, row = self.res.val.view(d, R), self.res.row.view(d, R)
        tok, act = self.res.tok.view(d, R, WINDOW), self.res.act.view(d, R, WINDOW)
        fb = (val.abs() / self.maxabs.clamp_min(1e-30)[:, None] * N_BANDS).long().clamp(0, N_BANDS - 1)
        fb[row < 0] = -1
        parts = []
        for band in range(N_BANDS):
            k = torch.where(fb == band, key, -math.inf)
            kk, ix = k.topk(PER_BAND, dim=1)
            v = val.gather(1, ix)
            r = torch.where(kk > -math.inf, row.gather(1, ix), -1)
            score = torch.where(r >= 0, v.abs() if self.signed else v, -math.inf)
            _, o = score.sort(dim=1, descending=True, stable=True)
            ix, r = ix.gather(1, o), r.gather(1, o)
            v = torch.where(r >= 0, val.gather(1, ix), 0.0)
            ix3 = ix[..., None].expand(-1, -1, WINDOW)
            empty = (r < 0)[..., None]
            parts.append((r, v, torch.where(empty, -1, tok.gather(1, ix3)), torch.where(empty, 0.0, act.gather(1, ix3))))
        return tuple(torch.cat([p[i] for p in parts], 1) for i in range(4))
