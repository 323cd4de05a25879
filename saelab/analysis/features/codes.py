"""One batch of the analyze pass as sparse codes: the encode dispatch (``sparse_codes``), the token ids of the
batch's rows (``TokenReader``) and the token windows around its entries (``Batch``).

A batch's codes are (key, value) entries with key = row · d_sae + latent, sorted, so the activation of any
(row, latent) is one ``searchsorted`` away; no dense [B, d_sae] tensor is formed for the TopK family.
"""

from __future__ import annotations

import numpy as np
import torch

from saelab.analysis.features.records import BEFORE, WINDOW


def sparse_codes(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero codes of a batch as (keys row·d_sae + latent, sorted; values).

    TopK-family SAEs (topk, abstopk, matryoshka, gradient without grads) go through the fused
    TopK encode (``evaluate.sparse_codes``: no [B, d_sae] tensor); others through ``sae.encode`` +
    ``nonzero`` in row chunks (``evaluate.dense_chunks``)."""
    from saelab.evaluate import dense_chunks
    from saelab.evaluate import sparse_codes as fused_codes

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


class TokenReader:
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


class Batch:
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
