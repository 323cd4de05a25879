"""The shuffled stream of a store's rows, in bounded memory, resumable exactly.

Each epoch permutes blocks of whole contexts across all shards, loads a buffer of blocks (the next
one prefetched in a thread), and permutes rows within it; memory is bounded by ``buffer_rows``
whatever the store's size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from saelab.errors import SaelabError


def _load_malloc_trim():
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6").malloc_trim
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        return fn
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc). Streaming buffers of several MB are freed
    and reallocated all the time; glibc keeps such blocks on its heap once its dynamic mmap
    threshold has risen, and the heap's free-but-resident pages then grow with the number of
    buffers served, i.e. with the store's size. Trimming once per buffer keeps RSS flat."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class _Block:
    shard: int  # index into store.shards
    start: int  # row within the shard
    stop: int


class BatchIterator:
    """Shuffled batches over a store; ``state_dict()`` captures (epoch, position, served).

    Each epoch's row order is a pure function of (seed, epoch): blocks of whole contexts
    (~4k rows) are permuted across all shards, grouped into buffers of ``buffer_rows``, and
    rows are permuted within each buffer. Batches are consecutive slices of the endless
    sequence of epochs, so a resumed iterator serves exactly the batches it would have.
    """

    def __init__(self, store, batch_size, split, tokens, seed, skip_bos, with_grads,
                 buffer_rows, dtype, device, shuffle, part=(0, 1)):
        self.store, self.batch_size, self.split = store, batch_size, split
        self.part = part
        self.seed, self.skip_bos, self.with_grads, self.shuffle = seed, skip_bos, with_grads, shuffle
        self.dtype, self.device = dtype, torch.device(device)
        ctx = store.context_size
        self.block_rows = ctx * max(1, 4096 // ctx)
        # unshuffled: nothing to mix, so one block at a time (memory flat in the store's size)
        self.blocks_per_group = max(1, buffer_rows // self.block_rows) if shuffle else 1
        self._blocks = [
            _Block(i, a, min(a + self.block_rows, store.shards[i]["rows"]))
            for i in store.split_shards(split)
            for a in range(0, store.shards[i]["rows"], self.block_rows)
        ]
        self.rows_per_epoch = sum(self._kept(b) for b in self._blocks)
        if self.rows_per_epoch == 0:
            raise SaelabError(f"store {store.path} has no rows to serve in split {split}")
        self.total = tokens if tokens is not None else self.rows_per_epoch
        self.epoch, self.offset, self.served = 0, 0, 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._plan_cache: tuple[int, list] | None = None
        self._buf: tuple | None = None  # (epoch, group index, start offset, arrays)
        self._next = None  # prefetch future: ((epoch, group), future)

    def _kept(self, b: _Block) -> int:
        n = b.stop - b.start
        return n - n // self.store.context_size if self.skip_bos else n

    # -- plan
    def _plan(self, epoch: int) -> list[tuple[list[_Block], int]]:
        """The epoch's groups: (blocks, rows kept) in serving order."""
        if self._plan_cache and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = np.arange(len(self._blocks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._blocks))
        groups = []
        for g in range(0, len(order), self.blocks_per_group):
            blocks = [self._blocks[j] for j in order[g : g + self.blocks_per_group]]
            groups.append((blocks, sum(self._kept(b) for b in blocks)))
        self._plan_cache = (epoch, groups)
        return groups

    def _owned(self, pos: np.ndarray) -> np.ndarray:
        """Which stream positions (rows served since the start) fall in this rank's slice of their batch."""
        r, world = self.part
        full = self.total // self.batch_size * self.batch_size  # the last, short batch splits by its length
        n = np.where(pos < full, self.batch_size, self.total - full)
        o = np.where(pos < full, pos % self.batch_size, pos - full)
        return (o >= n * r // world) & (o < n * (r + 1) // world)

    def _load(self, epoch: int, g: int):
        """The group's rows in serving order: all of them in one process; under ``part`` only the
        rows this rank serves (read, converted and held: about 1/world of the group), with the
        cumulative count of owned positions to find them by stream position."""
        groups = self._plan(epoch)
        blocks, n_rows = groups[g]
        ctx = self.store.context_size
        perm = np.random.default_rng([self.seed, epoch, g, 1]).permutation(n_rows) if self.shuffle else None
        cum = None
        sel = None  # source rows (of the group's sorted concatenation) this rank serves, in serving order
        if self.part[1] > 1:
            start = epoch * self.rows_per_epoch + sum(n for _, n in groups[:g])
            own = self._owned(start + np.arange(n_rows))
            cum = np.concatenate([[0], np.cumsum(own)])
            sel = perm[own] if perm is not None else np.flatnonzero(own)
        take = np.sort(sel) if sel is not None else None
        acts, grads, base = [], [], 0
        for b in sorted(blocks, key=lambda b: (b.shard, b.start)):  # sequential reads, then permute
            kept = self._kept(b)
            if take is not None:
                lo, hi = np.searchsorted(take, [base, base + kept])
                mine = take[lo:hi] - base
                base += kept
                if len(mine) == 0:
                    continue
            a = self.store.read(b.shard, b.start, b.stop)
            gr = self.store.read(b.shard, b.start, b.stop, "grads") if self.with_grads else None
            if self.skip_bos:
                keep = (np.arange(b.start, b.stop) % ctx) != 0
                a = a[keep]
                gr = gr[keep] if gr is not None else None
            if take is not None:
                a = a[mine]
                gr = gr[mine] if gr is not None else None
            acts.append(a)
            if gr is not None:
                grads.append(gr)
        empty = np.zeros((0, self.store.d_in), np.float32)
        a = torch.from_numpy(np.concatenate(acts) if acts else empty)
        gr = torch.from_numpy(np.concatenate(grads) if grads else empty) if self.with_grads else None
        if sel is not None:  # sorted reads → serving order
            order = torch.from_numpy(np.searchsorted(take, sel))
        elif perm is not None:  # a torch row gather, the faster of it and numpy fancy indexing
            order = torch.from_numpy(perm)
        else:
            order = None
        if order is not None:
            a = a.index_select(0, order)
            gr = gr.index_select(0, order) if gr is not None else None
        return a, gr, cum

    def _group_at(self, offset: int) -> tuple[int, int]:
        """(group index, rows before it) for a row offset within the current epoch."""
        start = 0
        for g, (_, n) in enumerate(self._plan(self.epoch)):
            if offset < start + n:
                return g, start
            start += n
        raise AssertionError("offset past the end of the epoch")

    def _group(self, epoch: int, g: int):
        key = (epoch, g)
        if self._next is not None and self._next[0] == key:
            arrays = self._next[1].result()
        else:
            arrays = self._load(epoch, g)
        # prefetch the following group while this one is served
        n_groups = len(self._plan(epoch))
        nxt = (epoch, g + 1) if g + 1 < n_groups else (epoch + 1, 0)
        self._next = (nxt, self._pool.submit(self._load, *nxt)) if nxt[0] == epoch else None
        return arrays

    # -- iteration
    def __iter__(self):
        return self

    def __len__(self) -> int:
        return -(-(self.total - self.served) // self.batch_size)

    def __next__(self):
        if self.served >= self.total:
            raise StopIteration
        need = min(self.batch_size, self.total - self.served)
        r, world = self.part
        if world > 1:  # this rank's slice of the batch: skip to it, serve it, skip past the batch
            lo, hi = need * r // world, need * (r + 1) // world
            self._skip(lo)
            x = self._serve(hi - lo)
            self._skip(need - hi)
            return x
        return self._serve(need)

    def _skip(self, n: int) -> None:
        self.served += n
        self.offset += n
        while self.offset >= self.rows_per_epoch:
            self.epoch, self.offset = self.epoch + 1, self.offset - self.rows_per_epoch

    def _serve(self, need: int):
        parts_a, parts_g = [], []
        while need:
            g, start = self._group_at(self.offset)
            if self._buf is None or self._buf[:2] != (self.epoch, g):
                if self._buf is not None:
                    self._buf = None
                    release_free_memory()
                self._buf = (self.epoch, g, start, self._group(self.epoch, g))
            a, gr, cum = self._buf[3]
            lo = self.offset - start
            hi = min(len(a) if cum is None else len(cum) - 1, lo + need)
            ia, ib = (lo, hi) if cum is None else (int(cum[lo]), int(cum[hi]))  # a holds only owned rows
            parts_a.append(a[ia:ib])
            if gr is not None:
                parts_g.append(gr[ia:ib])
            need -= hi - lo
            self.offset += hi - lo
            self.served += hi - lo
            if self.offset == self.rows_per_epoch:
                self.epoch, self.offset = self.epoch + 1, 0
        x = self._to_tensor(parts_a)
        if self.with_grads:
            return x, self._to_tensor(parts_g)
        return x

    def _to_tensor(self, parts):
        if not parts:
            parts = [torch.zeros(0, self.store.d_in)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    @property
    def epochs(self) -> float:
        """Epochs served so far (fractional)."""
        return self.epoch + self.offset / self.rows_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "served": self.served, "seed": self.seed,
                "batch_size": self.batch_size, "rows_per_epoch": self.rows_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["rows_per_epoch"] != self.rows_per_epoch or state["seed"] != self.seed:
            raise SaelabError("the store or seed changed since this state was saved: resume with the same store and --seed")
        self.epoch, self.offset, self.served = state["epoch"], state["offset"], state["served"]
        self._buf, self._next = None, None


class PairedBatches:
    """Stores' shuffled batches in lockstep: (x, y), row i of y the row of the same token as row i of x.

    The stores are row-aligned (one harvest pass: the same shards, contexts and rows; ``check_aligned``), so
    iterators of the same settings serve the same row positions in the same order: the pair needs no index of
    its own, and its state is the first input's (the others' is equal, and is set so on load). ``inputs`` and
    ``targets`` are each one iterator (x [B, d]) or a list of them, one per layer (x [B, layers, d], stacked)."""

    def __init__(self, inputs, targets):
        self._stack = (isinstance(inputs, list), isinstance(targets, list))
        self.inputs = inputs if isinstance(inputs, list) else [inputs]
        self.targets = targets if isinstance(targets, list) else [targets]
        first = self.inputs[0]
        for it in self.inputs[1:] + self.targets:
            if it.rows_per_epoch != first.rows_per_epoch or it.total != first.total:
                raise SaelabError(f"stores {first.store.path} and {it.store.path} do not serve the same rows: "
                                  "harvest both hooks in one run")

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.inputs[0])

    def __next__(self):
        x = [next(it) for it in self.inputs]
        y = [next(it) for it in self.targets]
        return (torch.stack(x, 1) if self._stack[0] else x[0]), (torch.stack(y, 1) if self._stack[1] else y[0])

    @property
    def rows_per_epoch(self) -> int:
        return self.inputs[0].rows_per_epoch

    @property
    def epochs(self) -> float:
        return self.inputs[0].epochs

    def state_dict(self) -> dict:
        return self.inputs[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for it in self.inputs + self.targets:
            it.load_state_dict(state)
