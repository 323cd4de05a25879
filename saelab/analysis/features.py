"""The feature database: ``analyze`` streams a store once through an SAE and writes
``features.h5`` into the SAE folder; ``FeatureDB`` reads it one latent card at a time.

One pass, bounded memory (everything kept is sized by d_sae, never by the store), over the
store in row order (``ActivationStore.batches(shuffle=False)``; batches hold whole contexts).
Per batch the SAE's codes become sparse (row, latent, value) entries — for the TopK family
straight from the chunked TopK encode, never a dense [B, d_sae] tensor — and every statistic
is a batched tensor op over those entries:

* firing count, sum, max and min per latent (``bincount`` / ``index_add`` / ``scatter_reduce``),
  and a histogram of non-zero |activation| over log-spaced bins shared by all latents
  (edges calibrated on the first batch: 0.1 % quantile / 4 … max × 8; values outside go to
  the end bins);
* the top-N examples per latent (and the most negative N for signed, AbsTopK, SAEs) and a
  random sample per (latent, activation band) — all kept in ``_TopBuffer``s: the running
  [slots, N] best is concatenated with each batch's candidates grouped per slot and
  re-top-k'd; only entries above a slot's current N-th value are looked at at all;
* each kept example carries its token window (``BEFORE`` tokens before, ``AFTER`` after,
  within its context) and this latent's activation on every token of the window, taken from
  the batch in hand when the example enters the buffer — so no second pass is needed.

Rows at position 0 (BOS, when the store includes it) are left out of every statistic and
example (they appear in windows only). Quantile bands are fractions of the latent's max
|activation| (``N_BANDS`` equal bands); during the pass samples are banded by the running max
and re-banded by the final max at the end, so each example is shown in its true band.

After the pass: logit effects (the decoder row, centred as the final LayerNorm does, through
``W_U`` — compatibility mode folds the final LayerNorm's scale into ``W_U``; an unfolded scale is
applied), nearest latents by decoder cosine, Matryoshka nesting groups.

``features.h5`` layout (``FORMAT_VERSION`` 1). The per-latent datasets are stored contiguous and
row-major, so one latent's slice of each is one contiguous byte range that HDF5 reads directly —
no chunk index to consult (measured with 16k latents: chunked one-latent-per-chunk storage read
~10× a card's own bytes, mostly fixed-array index pages; contiguous reads exactly its bytes):

* attrs: format_version, sae_sha256 (of sae_weights.safetensors), d_sae, d_in, hook, model,
  arch, signed, store, n_rows (rows analysed, BOS excluded), context_size, before, after, top,
  n_bands, per_band, sections (JSON: name → [start, stop) in the example axis).
* [d_sae] arrays (read eagerly by FeatureDB): density, mean_act, max_act, min_act, count,
  group (−1 = none).
* per-latent arrays [d_sae, ...]: ex_rows [d_sae, E] int64 (−1 = empty),
  ex_vals [d_sae, E], ex_tokens [d_sae, E, W] int32 token ids (−1 = past the context's end),
  ex_acts [d_sae, E, W], hist [d_sae, N_BINS] int64, logit_top_ids / logit_top /
  logit_bottom_ids / logit_bottom [d_sae, N_LOGITS], neighbours / neighbour_cos
  [d_sae, N_NEIGHBOURS]; for ``hook_z`` SAEs head_share [d_sae, n_heads] (attr n_heads): each
  head's share of the decoder row's squared norm. Window j of example e starts at context position
  max(0, p − before) for p = row % context_size, so the example's own token is at index
  min(p, before).
* shared: hist_edges [N_BINS + 1]; vocab_blob (uint8, UTF-8) + vocab_offsets [V + 1]: the token
  strings, so a card is decoded without loading the model or its tokenizer.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import os
import pathlib
import weakref
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.errors import SaelabError
from saelab.layout import CFG_FILE, FEATURES_FILE, LABELS_FILE, read_json_object
from saelab.device import one_thread
from saelab.hooks import hook_layer
from saelab.targets import sae_folders

FORMAT_VERSION = 1
BEFORE, AFTER = 10, 4  # tokens of context shown before / after an example's token
WINDOW = BEFORE + 1 + AFTER
N_BANDS = 4  # quantile bands: equal fractions of the latent's max |activation|
PER_BAND = 5  # examples kept per band
RESERVOIR = 8  # random samples kept per (latent, running band) during the pass
N_BINS = 64
N_LOGITS = 10
N_NEIGHBOURS = 10
BATCH_ROWS = 4096
MAX_TOP = 1000  # --top beyond this is a mistake: 1000 examples × 2 × d_sae windows is already gigabytes wide
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                  "hook_embed")
PER_LATENT = ("ex_rows", "ex_vals", "ex_tokens", "ex_acts", "hist", "logit_top_ids", "logit_top",
              "logit_bottom_ids", "logit_bottom", "neighbours", "neighbour_cos", "head_share")
EAGER = ("density", "mean_act", "max_act", "min_act", "count", "group")


# ============================================================================ the records
@dataclass
class Example:
    """One context window around an activating token."""

    row: int  # global row id in the store
    tokens: list[str]  # decoded token strings of the window
    acts: list[float]  # this latent's activation on each token of the window
    pos: int  # index in the window of the token the example is about
    value: float  # activation at pos


@dataclass
class LatentCard:
    latent: int
    density: float  # firing frequency (fraction of non-BOS rows with act != 0)
    mean_act: float  # mean of non-zero activations
    max_act: float  # largest activation
    hist_edges: list[float]  # histogram of non-zero |activations|, log-spaced bins
    hist_counts: list[int]
    top: list[Example]  # top-N by activation (signed SAEs: most positive)
    top_negative: list[Example]  # signed (abstopk) SAEs only: most negative; else []
    quantiles: list[tuple[str, list[Example]]]  # (band label, examples)
    logits_top: list[tuple[str, float]]  # tokens the decoder row promotes (via W_U)
    logits_bottom: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]  # nearest latents by decoder cosine
    group: int | None  # matryoshka nesting group index, else None
    min_act: float = 0.0  # smallest activation (negative only for signed SAEs)
    count: int = 0  # rows where the latent fired
    heads: list[tuple[str, float]] = field(default_factory=list)  # hook_z SAEs: ("L1H2", share), largest first


# ============================================================================ helpers
def sae_identity(sae_dir) -> dict:
    """{"sae_sha256", "d_sae", "d_in"} of an SAE folder (what features.h5 must match)."""
    from saelab.layout import WEIGHTS_FILE, read_sae_cfg
    from saelab.fs import sha256_file

    sae_dir = pathlib.Path(sae_dir).expanduser()
    cfg = read_sae_cfg(sae_dir)
    weights = sae_dir / WEIGHTS_FILE
    try:
        st = weights.stat()
    except OSError:
        raise SaelabError(f"{weights} is missing; point at an SAE folder (cfg.json + {WEIGHTS_FILE})") from None
    # the weights are written atomically (a new inode per save), so (inode, size, mtime) names one version:
    # hash each version once per process, not on every open of its features.h5
    key = (str(weights.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(weights)
    return {"sae_sha256": _SHA_CACHE[key], "d_sae": int(cfg["d_sae"]), "d_in": int(cfg["d_in"])}


_SHA_CACHE: dict[tuple, str] = {}


class _TokenReader:
    """Token ids of consecutive global rows, reading one shard's (small) token array at a time."""

    def __init__(self, store):
        self.store, self.ctx = store, store.context_size
        self._shard, self._tokens = None, None

    def get(self, start: int, stop: int) -> np.ndarray:
        out = []
        while start < stop:
            i = next(j for j, s in enumerate(self.store.shards) if s["first_row"] <= start < s["first_row"] + s["rows"])
            if self._shard != i:
                self._shard, self._tokens = i, self.store.read(i, 0, self.store.shards[i]["rows"] // self.ctx,
                                                               "tokens").reshape(-1)
            first = self.store.shards[i]["first_row"]
            hi = min(stop, first + self.store.shards[i]["rows"])
            out.append(self._tokens[start - first : hi - first])
            start = hi
        return np.concatenate(out).astype(np.int64)


class _Batch:
    """One batch's sparse codes (sorted keys row·d_sae + latent) and what windows need."""

    def __init__(self, keys, vals, tokens, r0, ctx, d_sae):
        self.keys, self.vals, self.tokens, self.r0, self.ctx, self.d_sae = keys, vals, tokens, r0, ctx, d_sae
        self.n = len(tokens)

    def windows(self, b: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [M, W], activations of ``lat`` [M, W]) of the windows around batch rows b."""
        dev = b.device
        p = (self.r0 + b) % self.ctx
        back = torch.clamp(p, max=BEFORE)
        j = torch.arange(WINDOW, device=dev)
        wb = (b - back)[:, None] + j[None, :]
        valid = ((p - back)[:, None] + j[None, :] < self.ctx) & (wb < self.n)
        wbc = wb.clamp(max=self.n - 1)
        tok = torch.where(valid, self.tokens[wbc], -1).to(torch.int32)
        q = wbc * self.d_sae + lat[:, None]
        if len(self.keys):
            at = torch.searchsorted(self.keys, q).clamp(max=len(self.keys) - 1)
            act = torch.where(valid & (self.keys[at] == q), self.vals[at], 0.0)
        else:
            act = torch.zeros(q.shape, device=dev)
        return tok, act.float()


class _TopBuffer:
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

    def offer(self, slot, key, val, b, lat, batch: _Batch) -> None:
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


def sparse_codes(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero codes of a batch as (keys row·d_sae + latent, sorted; values).

    TopK-family SAEs (topk, abstopk, matryoshka, gradient without grads) go through the fused
    TopK encode (``evaluate.sparse_codes``: no [B, d_sae] tensor); others through ``sae.encode`` +
    ``nonzero`` in row chunks (``evaluate.dense_chunks``)."""
    from saelab.evaluate import dense_chunks, sparse_codes as fused_codes

    B = x.shape[0]
    codes = fused_codes(sae, x)
    if codes is not None:
        v, i = codes
        i, order = i.sort(dim=1)  # sorted within rows = sorted keys overall
        keys = (torch.arange(B, device=x.device)[:, None] * sae.d_sae + i).reshape(-1)
        v = v.gather(1, order).reshape(-1)
        keep = v != 0
        return keys[keep], v[keep]
    keys, vals = [], []
    for a, part in dense_chunks(sae, x):
        f = sae.encode(part)
        nz = f.nonzero()
        keys.append((nz[:, 0] + a) * sae.d_sae + nz[:, 1])
        vals.append(f[nz[:, 0], nz[:, 1]])
    return torch.cat(keys), torch.cat(vals)


# ============================================================================ analyze
class _Accumulator:
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
        self.pos = _TopBuffer(d_sae, top, device)
        self.neg = _TopBuffer(d_sae, top, device) if signed else None
        self.res = _TopBuffer(d_sae * N_BANDS, RESERVOIR, device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.rows = 0

    def add(self, batch: _Batch, bos: bool) -> None:
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


def _direct_path_parts(model, sae):
    """The pieces of the direct path from the SAE's hook to the logits: (W_O [d_in, d_model] for ``attn.hook_z``
    (heads flattened head-major, as harvest stores them) else None, the final LN's scale [d_model] when
    compatibility mode has not folded it else None, whether the final LN centres its input, W_U [d_model, vocab]);
    None when the hook reaches the residual stream by no fixed linear map (hook_q, MLP pre-acts, …)."""
    hook = sae.cfg.hook_name or ""
    if model is None:
        return None
    W_O = None
    if hook.endswith("attn.hook_z") and hook_layer(hook) is not None:
        W_O = model.blocks[hook_layer(hook)].attn.W_O.detach()  # [n_heads, d_head, d_model]
        W_O = W_O.reshape(-1, W_O.shape[-1])  # [n_heads · d_head, d_model], head-major as the store's rows
        if W_O.shape[0] != sae.d_in:
            return None
    elif not any(hook.endswith(h) for h in RESIDUAL_HOOKS):
        return None
    W_U = model.W_U.detach()
    if W_U.shape[0] != (sae.d_in if W_O is None else W_O.shape[1]):
        return None
    ln = getattr(model, "ln_final", None)
    w = getattr(ln, "w", None)
    if w is None:
        w = getattr(getattr(ln, "_original_component", None), "weight", None)
    scale = None
    if w is not None and not torch.allclose(w.float(), torch.ones_like(w.float())):
        scale = w.detach()  # not folded by compatibility mode: applied here
    center = getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre")
    return W_O, scale, center, W_U


def _apply_direct_path(parts, d: torch.Tensor) -> torch.Tensor:
    """``parts`` (``_direct_path_parts``) applied to directions ``d`` [..., d_in] → [..., vocab]: W_O, then the
    centring (LayerNorm: d ↦ d − mean(d)) and the scale on the d_model side, then W_U."""
    W_O, scale, center, W_U = parts
    r = d.to(W_U.device, torch.float32)
    if W_O is not None:
        r = r @ W_O.float()
    if center:
        r = r - r.mean(-1, keepdim=True)
    if scale is not None:
        r = r * scale.float()
    return r.to(W_U.dtype) @ W_U


def direct_logits(model, sae, d: torch.Tensor) -> torch.Tensor | None:
    """The direct path from the SAE's hook to the logits (through the final LN's scale and centring; for
    ``attn.hook_z`` first through that layer's W_O, as attention-SAE work reads a latent's direct logit effect)
    applied to directions ``d`` [..., d_in] → [..., vocab], without forming a [d_in, vocab] matrix. None when
    the hook has no direct path (``_direct_path_parts``)."""
    parts = _direct_path_parts(model, sae)
    return None if parts is None else _apply_direct_path(parts, d)


@torch.no_grad()
def logit_effects(model, sae, k: int = N_LOGITS, budget: int = 1 << 25):
    """(top ids, top values, bottom ids, bottom values) [d_sae, k] of every latent's direct logit effect
    (``direct_logits`` of its decoder row), or None when the hook has no direct path.

    Latents go in chunks of ``budget // vocab`` rows (at least 1): one chunk's [rows, vocab] float32 logits
    (128 MiB at the default) are the only vocabulary-wide temporary; no [d_in, vocab] matrix is formed, which
    for a Gemma-2 vocabulary (256k) would be 2.4 GB next to the model's own W_U."""
    parts = _direct_path_parts(model, sae)
    if parts is None:
        return None
    W_dec = sae.W_dec.detach()
    vocab = parts[3].shape[1]
    k = min(k, vocab)
    chunk = max(1, budget // vocab)
    out = [[], [], [], []]
    for c0 in range(0, W_dec.shape[0], chunk):
        L = _apply_direct_path(parts, W_dec[c0 : c0 + chunk]).float()
        tv, ti = L.topk(k, dim=1)
        bv, bi = L.topk(k, dim=1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv)):
            lst.append(t.to(W_dec.device))
    return tuple(torch.cat(t) for t in out)


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """The rows of ``W`` (decoder directions) scaled to unit norm, in float32 (all-zero rows stay zero)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def best_matches(A: torch.Tensor, B: torch.Tensor, k: int = 1, budget: int = 1 << 25, signed: bool = False,
                 exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines) [len(A), k]: for every row of ``A`` the ``k`` rows of ``B`` of highest cosine, best first
    (rows unit-normed here). ``signed``: rank by |cosine| and report it (a signed SAE's latent is the same
    feature read with either sign of its direction). ``exclude_self``: A is B, and a row is not its own match.
    Rows of A go in chunks of ``budget // len(B)`` (at least 1), so one chunk's [rows, len(B)] cosines stay within
    128 MiB at the default whatever the widths."""
    An, Bn = unit_rows(A), unit_rows(B)
    nb = Bn.shape[0]
    k = min(k, nb - int(exclude_self))
    chunk = max(1, budget // nb)
    ids, cos = [], []
    for c0 in range(0, An.shape[0], chunk):
        S = An[c0 : c0 + chunk] @ Bn.T
        if signed:
            S.abs_()
        if exclude_self:
            n = S.shape[0]
            S[torch.arange(n), torch.arange(c0, c0 + n)] = -math.inf
        v, i = S.topk(k, dim=1)
        ids.append(i)
        cos.append(v)
    return torch.cat(ids), torch.cat(cos)


def either_signed(a, b) -> bool:
    """Whether either SAE reads its features with both signs (AbsTopK): their latents then match by |cosine|."""
    return bool(getattr(a, "signed", False) or getattr(b, "signed", False))


def decoder_matches(a, b, k: int = 1, latents=None, budget: int = 1 << 25,
                    device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines) [n, k], on the CPU: for each latent of SAE ``a`` (all, or the ids ``latents``) the ``k``
    latents of SAE ``b`` whose decoder rows are closest (``best_matches``; by |cosine| when either is signed).
    ``device``: where the products run (default: where the decoders are)."""
    Wa, Wb = a.W_dec.detach(), b.W_dec.detach()
    if latents is not None:
        Wa = Wa[latents]
    if device is not None:
        Wa, Wb = Wa.to(device), Wb.to(device)
    ids, cos = best_matches(Wa, Wb, k, budget, signed=either_signed(a, b))
    return ids.cpu(), cos.cpu()


def neighbours(W_dec: torch.Tensor, k: int = N_NEIGHBOURS, budget: int = 1 << 25):
    """(ids, cosines) [d_sae, k] of the nearest other latents by decoder cosine (``best_matches`` of the
    decoder with itself, in chunks: within 128 MiB of cosines at the default, where a fixed 1,024 rows would
    be 4 GiB at a million latents)."""
    return best_matches(W_dec, W_dec, k, budget, exclude_self=True)


def head_shares(W_dec: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[d_sae, n_heads]: each head's share of every decoder row's squared norm, for an SAE on
    ``attn.hook_z`` with the heads flattened head-major (as harvest stores them). A latent whose
    row lives in one head's slice has share 1 there: the head it reads from and writes through."""
    sq = W_dec.detach().float().reshape(W_dec.shape[0], n_heads, -1).pow(2).sum(-1)
    return sq / sq.sum(-1, keepdim=True).clamp_min(1e-30)


def _head_layout(store, sae, model) -> dict | None:
    """{"n_heads", "layer"} when the SAE reads attn.hook_z with its heads flattened, else None."""
    hook = sae.cfg.hook_name or store.hook
    if not hook.endswith("attn.hook_z"):
        return None
    n_heads = (store.manifest.get("head_layout") or {}).get("n_heads") or getattr(getattr(model, "cfg", None),
                                                                                 "n_heads", None)
    if not n_heads or sae.d_in % int(n_heads):
        return None
    return {"n_heads": int(n_heads), "layer": hook_layer(hook)}


def nesting_groups(sae) -> np.ndarray | None:
    """Matryoshka (prefix mode): the index of the smallest nested prefix holding each latent."""
    if getattr(sae, "arch", "") != "matryoshka" or sae.cfg.matryoshka_mode != "prefix":
        return None
    return np.searchsorted(np.array(sae.prefixes()), np.arange(sae.d_sae), side="right")


def _vocab(model) -> list[str]:
    tok = getattr(model, "tokenizer", None) if model is not None else None
    if tok is None:
        return []
    n = int(model.cfg.d_vocab)
    return tok.batch_decode([[i] for i in range(n)])


@torch.no_grad()
def analyze(sae_dir, activations=None, *, tokens=None, top=20, model=None, device="auto",
            progress=True, batch_size: int = BATCH_ROWS) -> pathlib.Path:
    """Writes <sae_dir>/features.h5 (atomically) and returns its path. activations: store folder or RUN
    folder (default: the store the SAE was trained on, from train.json). ``tokens``: analyse only the
    first N rows (rounded up to whole contexts). ``model``: a loaded model for logit effects and token
    strings (default: load the store's model; none for synthetic stores)."""
    from saelab.device import pick_device
    from saelab.models import load_model
    from saelab.sae.base import SAE
    from saelab.layout import GROUP_FILE
    from saelab.fs import fsync_dir, fsync_file, temp_name
    from saelab.targets import store_for_sae

    sae_dir = pathlib.Path(sae_dir).expanduser()
    if (sae_dir / GROUP_FILE).is_file():
        raise SaelabError(f"{sae_dir} is a group folder: analyse it with `saelab analyze --sae {sae_dir}` "
                          "(or analyze() each of its SAE folders)")
    if not 1 <= int(top) <= MAX_TOP:  # every latent keeps 2 × top examples with their windows: d_sae × top sized
        raise SaelabError(f"--top must be between 1 and {MAX_TOP} (got {top}): it is the examples kept per latent, "
                          f"each with a {WINDOW}-token window (the default 20 is what the app shows)")
    if tokens is not None and int(tokens) < 1:
        raise SaelabError(f"--tokens must be at least 1 (got {tokens})")
    ident = sae_identity(sae_dir)
    from saelab.fs import check_writable_in

    check_writable_in(sae_dir, FEATURES_FILE)  # features.h5 is written at the end of the pass
    dev = torch.device(pick_device(device))
    sae = SAE.load(sae_dir, device=dev).eval()
    store = store_for_sae(sae_dir, sae, activations)
    signed = bool(getattr(sae, "signed", False))
    name = store.manifest.get("model") or sae.cfg.model_name
    if model is None and name and name != "synthetic":
        model = load_model(name, device=str(dev))

    ctx = store.context_size
    n_all = store.n_rows("all")
    n = n_all if tokens is None else min(n_all, -(-int(tokens) // ctx) * ctx)
    bs = ctx * max(1, int(batch_size) // ctx)
    it = store.batches(bs, split="all", tokens=n, shuffle=False, device=dev)
    bos = bool(store.manifest.get("bos_included", False))
    acc = _Accumulator(sae.d_sae, int(top), signed, dev)
    reader = _TokenReader(store)
    r0 = 0
    with tqdm(total=n, disable=not progress, desc=f"analyze {store.hook}", unit="tok", unit_scale=True) as bar:
        for x in it:
            keys, vals = sparse_codes(sae, x)
            toks = torch.from_numpy(reader.get(r0, r0 + len(x))).to(dev)
            with one_thread(dev):
                acc.add(_Batch(keys, vals, toks, r0, ctx, sae.d_sae), bos)
            r0 += len(x)
            bar.update(len(x))
    store.close()

    W_dec = sae.W_dec.detach()
    lt = logit_effects(model, sae)
    nb_ids, nb_cos = neighbours(W_dec)
    groups = nesting_groups(sae)
    heads = _head_layout(store, sae, model)
    q_rows, q_vals, q_tok, q_act = acc.quantiles()

    def np_(t):
        return t.detach().cpu().numpy()

    sections, ex = {}, {"rows": [], "vals": [], "tok": [], "act": []}

    def add_section(name, rows, vals, tok, act):
        start = sum(x.shape[1] for x in ex["rows"])
        sections[name] = [start, start + rows.shape[1]]
        for k_, t in zip(("rows", "vals", "tok", "act"), (rows, vals, tok, act)):
            ex[k_].append(t)

    for sec, buf in (("top", acc.pos), ("top_negative", acc.neg)):
        if buf is not None:
            _, val, row, tok, act = buf.sorted()
            add_section(sec, row, torch.where(row >= 0, val, 0.0), tok, act)
    add_section("quantiles", q_rows, q_vals, q_tok, q_act)

    cnt = acc.count
    fired = cnt > 0
    rows_counted = max(acc.rows, 1)
    small = {
        "density": np_(cnt.double() / rows_counted),
        "mean_act": np_(torch.where(fired, acc.sum / cnt.clamp_min(1), 0.0).float()),
        "max_act": np_(torch.where(fired, acc.max, 0.0)),
        "min_act": np_(torch.where(fired, acc.min, 0.0)),
        "count": np_(cnt),
        "group": groups if groups is not None else np.full(sae.d_sae, -1, dtype=np.int64),
    }
    edges = acc.edges if acc.edges is not None else torch.logspace(-3, 3, N_BINS + 1)
    per = {
        "ex_rows": np_(torch.cat(ex["rows"], 1)),
        "ex_vals": np_(torch.cat(ex["vals"], 1)).astype(np.float32),
        "ex_tokens": np_(torch.cat(ex["tok"], 1)).astype(np.int32),
        "ex_acts": np_(torch.cat(ex["act"], 1)).astype(np.float32),
        "hist": np_(acc.hist.view(sae.d_sae, N_BINS)),
        "neighbours": np_(nb_ids).astype(np.int32),
        "neighbour_cos": np_(nb_cos).astype(np.float32),
    }
    if lt is not None:
        per.update(logit_top_ids=np_(lt[0]).astype(np.int32), logit_top=np_(lt[1]),
                   logit_bottom_ids=np_(lt[2]).astype(np.int32), logit_bottom=np_(lt[3]))
    if heads is not None:
        per["head_share"] = np_(head_shares(W_dec, heads["n_heads"])).astype(np.float32)
    vocab = _vocab(model)
    attrs = {
        "format_version": FORMAT_VERSION, **ident, "hook": store.hook, "model": name or "",
        "arch": sae.arch, "signed": signed, "store": str(store.path), "n_rows": acc.rows, "context_size": ctx,
        "before": BEFORE, "after": AFTER, "top": int(top), "n_bands": N_BANDS, "per_band": PER_BAND,
        "sections": json.dumps(sections), "bos_excluded": bos,
        **({"n_heads": heads["n_heads"], "head_layer": -1 if heads["layer"] is None else heads["layer"]}
           if heads is not None else {}),
    }
    final = sae_dir / FEATURES_FILE
    tmp = temp_name(final)
    try:
        _write(tmp, attrs, small, per, np_(edges).astype(np.float64), vocab)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(sae_dir)
    return final


def _write(tmp: pathlib.Path, attrs: dict, small: dict, per: dict, edges: np.ndarray, vocab: list[str]) -> None:
    with h5py.File(tmp, "w", libver="latest") as f:
        f.attrs.update(attrs)
        for k_, v in small.items():
            f.create_dataset(k_, data=v)
        for k_, v in per.items():  # contiguous, row-major: one latent = one contiguous byte range
            f.create_dataset(k_, data=v)
        f.create_dataset("hist_edges", data=edges)
        blob = [s.encode("utf-8", "surrogatepass") for s in vocab]
        f.create_dataset("vocab_offsets", data=np.concatenate([[0], np.cumsum([len(s) for s in blob])]).astype(np.int64))
        f.create_dataset("vocab_blob", data=np.frombuffer(b"".join(blob), dtype=np.uint8))


def analyze_all(path, activations=None, **kw) -> list[pathlib.Path]:
    """``analyze`` every SAE of ``path`` (a group folder's SAEs, or the one SAE folder)."""
    return [analyze(folder, activations, **kw) for folder in sae_folders(path)]


# ============================================================================ reading
class _CountingFile(io.FileIO):
    """A read-only file that counts the bytes HDF5 reads through it (``bytes_read``)."""

    bytes_read = 0

    def readinto(self, b):
        n = super().readinto(b)
        self.bytes_read += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data


# h5py reads through a Python file object here (to count bytes); closing such a file during
# interpreter teardown, after the modules it calls back into are gone, crashes the process — so
# every database still open is closed at exit, while the interpreter is whole.
_OPEN: "weakref.WeakSet[FeatureDB]" = weakref.WeakSet()


@atexit.register
def _close_open_databases() -> None:
    for db in list(_OPEN):
        db.close()


class FeatureDB:
    """Read access to ``features.h5``: small [d_sae] arrays eagerly, one latent's slices per ``card``.

    Refuses (SaelabError naming the fix) a missing file, or one written for another SAE (weights
    checksum, d_sae or d_in differ). ``bytes_read`` counts the file bytes read so far.
    """

    def __init__(self, sae_dir):
        self.sae_dir = pathlib.Path(sae_dir).expanduser()
        self.path = self.sae_dir / FEATURES_FILE
        fix = f"run `saelab analyze --sae {self.sae_dir}`"
        ident = sae_identity(self.sae_dir)
        if not self.path.is_file():
            raise SaelabError(f"{self.path} is missing: {fix}")
        self._raw = _CountingFile(self.path, "r")
        _OPEN.add(self)
        try:
            self._f = h5py.File(self._raw, "r")
        except OSError:
            self._raw.close()
            raise SaelabError(f"{self.path} is not a readable features file: {fix} again") from None
        a = self._f.attrs
        try:
            if int(a["format_version"]) > FORMAT_VERSION:
                raise SaelabError(f"{self.path} has format {a['format_version']}, newer than this saelab: upgrade saelab")
            theirs = (int(a["d_sae"]), int(a["d_in"]))
            if theirs != (ident["d_sae"], ident["d_in"]):
                raise SaelabError(f"{self.path} was written for another SAE (d_sae {theirs[0]}, d_in {theirs[1]}; this "
                                  f"SAE has {ident['d_sae']}, {ident['d_in']}): {fix} again")
            if str(a["sae_sha256"]) != ident["sae_sha256"]:
                raise SaelabError(f"{self.path} was written for another SAE (the weights' sha256 differs): {fix} again")
        except KeyError as e:
            self.close()
            raise SaelabError(f"{self.path} lacks {e}: it was not written by saelab analyze; {fix} again") from None
        except SaelabError:
            self.close()
            raise
        self.d_sae: int = int(a["d_sae"])
        self.d_in: int = int(a["d_in"])
        self.signed: bool = bool(a["signed"])
        self.hook: str = str(a["hook"])
        self.model: str = str(a["model"])
        self.arch: str = str(a["arch"])
        self.n_rows: int = int(a["n_rows"])
        self.context_size: int = int(a["context_size"])
        self.before: int = int(a["before"])
        self.n_bands: int = int(a["n_bands"])
        self.sections: dict = json.loads(a["sections"])
        self.head_layer: int | None = int(a["head_layer"]) if "head_layer" in a and a["head_layer"] >= 0 else None
        for k in EAGER:
            setattr(self, k, self._f[k][:])
        self.hist_edges = self._f["hist_edges"][:]
        self._ds = {k: self._f[k] for k in PER_LATENT if k in self._f}
        self._vocab: list[str] | None = None
        self.vocab()  # shared by every card: read once here, so a card reads only its own slices
        self._logit_index = None

    # -- plumbing
    @property
    def bytes_read(self) -> int:
        return self._raw.bytes_read

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None
        if not self._raw.closed:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.d_sae

    def vocab(self) -> list[str]:
        if self._vocab is None:
            off = self._f["vocab_offsets"][:]
            blob = self._f["vocab_blob"][:].tobytes()
            self._vocab = [blob[off[i] : off[i + 1]].decode("utf-8", "replace") for i in range(len(off) - 1)]
        return self._vocab

    def token_str(self, i: int) -> str:
        v = self.vocab()
        return v[i] if 0 <= i < len(v) else f"#{i}"

    def _latent(self, latent) -> int:
        try:
            i = int(latent)
        except (TypeError, ValueError):
            raise SaelabError(f"latent {latent!r} is not an integer") from None
        if not 0 <= i < self.d_sae:
            raise SaelabError(f"latent {i} is out of range: this SAE has latents 0..{self.d_sae - 1}")
        return i

    # -- cards
    def card(self, latent: int) -> LatentCard:
        """One latent's card; reads only that latent's slice of each per-latent dataset."""
        i = self._latent(latent)
        d = {k: ds[i] for k, ds in self._ds.items()}
        rows, vals, toks, acts = d["ex_rows"], d["ex_vals"], d["ex_tokens"], d["ex_acts"]

        def examples(name):
            if name not in self.sections:
                return []
            a, b = self.sections[name]
            return [self._example(rows[e], vals[e], toks[e], acts[e]) for e in range(a, b) if rows[e] >= 0]

        qs = []
        if "quantiles" in self.sections:
            a, _ = self.sections["quantiles"]
            nb = self.n_bands
            per = (self.sections["quantiles"][1] - a) // nb
            of = "of max |act|" if self.signed else "of max"
            for band in reversed(range(nb)):
                lo, hi = band / nb, (band + 1) / nb
                exs = [self._example(rows[e], vals[e], toks[e], acts[e])
                       for e in range(a + band * per, a + (band + 1) * per) if rows[e] >= 0]
                qs.append((f"{lo:.2f}–{hi:.2f} {of}", exs))
        counts = d["hist"]
        nz = np.nonzero(counts)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        if "logit_top_ids" in d:
            lt = [(self.token_str(int(t)), float(v)) for t, v in zip(d["logit_top_ids"], d["logit_top"])]
            lb = [(self.token_str(int(t)), float(v)) for t, v in zip(d["logit_bottom_ids"], d["logit_bottom"])]
        else:
            lt = lb = []
        g = int(self.group[i])
        heads = []
        if "head_share" in d:  # hook_z SAEs: the heads the decoder row lives in, largest share first
            L = f"L{self.head_layer}" if self.head_layer is not None else ""
            heads = sorted(((f"{L}H{h}", float(x)) for h, x in enumerate(d["head_share"])), key=lambda t: -t[1])
        return LatentCard(
            latent=i, density=float(self.density[i]), mean_act=float(self.mean_act[i]), max_act=float(self.max_act[i]),
            hist_edges=[float(e) for e in self.hist_edges[lo : hi + 1]] if hi else [],
            hist_counts=[int(c) for c in counts[lo:hi]],
            top=examples("top"), top_negative=examples("top_negative"), quantiles=qs,
            logits_top=lt, logits_bottom=lb,
            neighbours=[(int(j), float(c)) for j, c in zip(d["neighbours"], d["neighbour_cos"])],
            group=g if g >= 0 else None, min_act=float(self.min_act[i]), count=int(self.count[i]), heads=heads,
        )

    def _example(self, row, value, tok, act) -> Example:
        keep = tok >= 0
        p = int(row) % self.context_size
        return Example(row=int(row), tokens=[self.token_str(int(t)) for t in tok[keep]],
                       acts=[float(x) for x in act[keep]], pos=min(p, self.before), value=float(value))

    # -- search
    def by_token(self, token: str, n: int = 20) -> list[tuple[int, float]]:
        """Latents whose logit effect promotes ``token`` (among their top N_LOGITS tokens), by logit
        effect. Exact token-string match first (" the"), else ignoring surrounding spaces."""
        if "logit_top_ids" not in self._ds:
            return []
        ids = self._token_ids(token)
        if not ids:
            return []
        if self._logit_index is None:
            self._logit_index = (self._ds["logit_top_ids"][:], self._ds["logit_top"][:])
        top_ids, top_vals = self._logit_index
        hit = np.isin(top_ids, ids)
        score = np.where(hit, top_vals, -np.inf).max(1)
        latents = np.nonzero(np.isfinite(score))[0]
        latents = latents[np.argsort(-score[latents], kind="stable")][:n]
        return [(int(j), float(score[j])) for j in latents]

    def _token_ids(self, token: str) -> list[int]:
        """The vocabulary ids of ``token``: its exact entry, else the entries equal to it ignoring surrounding
        spaces ([] for none)."""
        vocab = self.vocab()
        ids = [i for i, s in enumerate(vocab) if s == token]
        if not ids and token.strip():
            ids = [i for i, s in enumerate(vocab) if s.strip() == token.strip()]
        return ids

    def in_vocab(self, token: str) -> bool:
        """Whether ``token`` is one vocabulary entry (exactly, or ignoring surrounding spaces), as ``by_token``
        matches it."""
        return bool(self._token_ids(token))

    def similar_tokens(self, text: str, n: int = 5) -> list[str]:
        """Up to ``n`` vocabulary entries for a string that is not one: those that start with it (spaces
        ignored), shortest first, then those it starts with, longest first (the first token of a
        multi-token string)."""
        t = text.strip()
        if not t:
            return []
        vocab = [s for s in self.vocab() if s.strip()]
        starts = sorted({s for s in vocab if s.strip().startswith(t)}, key=lambda s: (len(s.strip()), s))
        prefixes = sorted({s for s in vocab if t.startswith(s.strip()) and s not in starts},
                          key=lambda s: (-len(s.strip()), s))
        return (starts + prefixes)[:n]


# ============================================================================ labels
def load_labels(sae_dir) -> dict[int, str]:
    """{latent: label} from the SAE folder's labels.json ({} when there is none)."""
    p = pathlib.Path(sae_dir) / LABELS_FILE
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise SaelabError(f"{p} is not valid JSON ({e.msg}): fix it or delete it") from None
    if not isinstance(raw, dict):
        raise SaelabError(f"{p} must hold a JSON object {{\"latent id\": \"label\"}}: fix it or delete it")
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise SaelabError(f"{p} has a key that is not a latent id: fix it or delete it") from None


def save_label(sae_dir, latent: int, text: str) -> None:
    """Set (or, for empty text, delete) one latent's label; labels.json is rewritten atomically."""
    from saelab.fs import atomic_write_text

    sae_dir = pathlib.Path(sae_dir)
    if not sae_dir.is_dir():
        raise SaelabError(f"{sae_dir}: no such SAE folder")
    cfg = read_json_object(sae_dir / CFG_FILE) or {}
    d_sae = cfg.get("d_sae")
    if d_sae and not 0 <= int(latent) < d_sae:
        raise SaelabError(f"latent {latent} is out of range: this SAE has latents 0..{d_sae - 1}")
    labels = load_labels(sae_dir)
    text = (text or "").strip()
    if text:
        labels[int(latent)] = text
    else:
        labels.pop(int(latent), None)
    atomic_write_text(sae_dir / LABELS_FILE,
                      json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=1, ensure_ascii=False) + "\n")
