"""Reading a store: shards opened (and checksummed) on first use, random access to rows and contexts.

Every shard's sha256 is verified the first time it is opened, before any of its rows are served.
"""

from __future__ import annotations

import os
import pathlib
import threading

import h5py
import numpy as np
import torch

from saelab.errors import SaelabError
from saelab.fs import check_regular, sha256_file
from saelab.store.manifest import DTYPES, read_manifest
from saelab.store.stream import BatchIterator


class ActivationStore:
    """Reads one store. ``batches()`` streams shuffled rows with bounded memory.

    Training rows (split='train') exclude the held-out shards; split='holdout' reads only
    them. Every shard's sha256 is verified the first time it is opened, before any of its
    rows are served; a mismatch raises SaelabError.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = pathlib.Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.d_in: int = m["d_in"]
        self.context_size: int = m["context_size"]
        self.hook: str = m["hook"]
        self.has_grads: bool = m["has_grads"]
        self.shards: list[dict] = m["shards"]
        self._holdout = set(m["holdout_shards"])
        self.verify = verify
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._handles: dict[str, h5py.File] = {}

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, hook={self.hook}, rows={self.n_rows('all'):,}, "
                f"d_in={self.d_in}, shards={len(self.shards)}, holdout={len(self._holdout)})")

    # -- shards
    def split_shards(self, split: str = "train") -> list[int]:
        if split not in ("train", "holdout", "all"):
            raise SaelabError(f"split must be train, holdout or all (got {split})")
        return [i for i, s in enumerate(self.shards)
                if split == "all" or (s["file"] in self._holdout) == (split == "holdout")]

    def check_shards(self, split: str = "all") -> None:
        """Open (and, with ``verify``, checksum) every shard of ``split`` now: a missing or damaged one is a one-line
        error before a long run, not after it (training reads the held-out shards only at its end)."""
        for i in self.split_shards(split):
            self._file(i)

    def n_rows(self, split: str = "train") -> int:
        return sum(self.shards[i]["rows"] for i in self.split_shards(split))

    def _file(self, i: int) -> h5py.File:
        shard = self.shards[i]
        name = shard["file"]
        with self._lock:
            if name in self._handles:
                return self._handles[name]
            path = self.path / name
            if not path.exists():
                raise SaelabError(f"shard {path} listed in the manifest is missing: restore it or harvest the store again")
            if self.verify and name not in self._verified:
                if sha256_file(path) != shard["sha256"]:
                    raise SaelabError(
                        f"shard {path} is corrupted (sha256 differs from the manifest): "
                        "delete the store and harvest it again"
                    )
                self._verified.add(name)
            try:
                f = h5py.File(check_regular(path), "r")
            except OSError as e:
                raise SaelabError(f"shard {path} cannot be opened ({e}): delete the store and harvest it again") from None
            if "activations" not in f:
                f.close()
                raise SaelabError(f"shard {path} holds no 'activations' dataset: delete the store and harvest it again")
            got, want = f["activations"], np.dtype(DTYPES[self.manifest["dtype"]])
            why = (f"has shape {got.shape}, manifest says ({shard['rows']}, {self.d_in})"
                   if got.shape != (shard["rows"], self.d_in) else
                   f"holds {got.dtype} rows, manifest says dtype {want}" if got.dtype != want else None)
            if why:  # a shard that is not what the manifest lists is refused before any of its rows is served
                f.close()
                raise SaelabError(f"shard {path} {why}: harvest the store again")
            self._handles[name] = f
            return f

    def close(self) -> None:
        with self._lock:
            for f in self._handles.values():
                f.close()
            self._handles.clear()

    def read(self, i: int, start: int, stop: int, what: str = "activations") -> np.ndarray:
        """Rows [start, stop) of shard i (local row numbers) as a numpy array."""
        return self._file(i)[what][start:stop]

    # -- random access
    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        firsts = np.array([s["first_row"] for s in self.shards])
        idx = np.searchsorted(firsts, rows, side="right") - 1
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows("all")):
            raise SaelabError(f"row ids must be in [0, {self.n_rows('all')})")
        return idx, rows - firsts[idx]

    def rows(self, row_ids, what: str = "activations") -> torch.Tensor:
        """Activations (or grads) of the given global rows, in the given order."""
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        shard_idx, local = self._locate(row_ids)
        out = np.empty((len(row_ids), self.d_in), dtype=DTYPES[self.manifest["dtype"]])
        for i in np.unique(shard_idx):
            sel = np.nonzero(shard_idx == i)[0]
            want, back = np.unique(local[sel], return_inverse=True)  # h5py reads increasing, distinct indices
            out[sel] = self._file(int(i))[what][want][back]
        return torch.from_numpy(out)

    def context(self, row: int) -> tuple[np.ndarray, int]:
        """(token ids of the context holding global row ``row``, its position in it)."""
        shard_idx, local = self._locate(np.array([row]))
        i, r = int(shard_idx[0]), int(local[0])
        return self._file(i)["tokens"][r // self.context_size], r % self.context_size

    def tokens(self, split: str = "all") -> np.ndarray:
        """All token ids of the split, [n_contexts, context_size] int32 (the store's text)."""
        parts = [self._file(i)["tokens"][:] for i in self.split_shards(split)]
        return np.concatenate(parts) if parts else np.zeros((0, self.context_size), np.int32)

    # -- streaming
    def batches(self, batch_size: int, split: str = "train", tokens: int | None = None, seed: int = 0,
                skip_bos: bool = False, with_grads: bool = False, buffer_rows: int = 1 << 18,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                shuffle: bool = True, part: tuple[int, int] = (0, 1)) -> "BatchIterator":
        """An iterator of shuffled batches [batch_size, d_in] (and grads, if asked).

        Runs epoch after epoch (reshuffled each epoch) until ``tokens`` rows were served;
        ``tokens=None`` means one epoch. Memory: about ``buffer_rows`` rows at a time
        (unshuffled reads use one block of ~4k rows at a time, whatever ``buffer_rows``).
        ``part=(rank, world)``: every batch is the rank's slice (rows
        [rank·n/world, (rank+1)·n/world)) of the batch one process would get, so ``world``
        iterators with the same seed together serve exactly the single-process batches.
        """
        if with_grads and not self.has_grads:
            raise SaelabError(f"store {self.path} has no grads: harvest it again with --with-grads")
        if not self.split_shards(split):
            raise SaelabError(f"store {self.path} has no {split} shards" +
                              (": harvest with --holdout > 0" if split == "holdout" else ""))
        return BatchIterator(self, batch_size, split, tokens, seed, skip_bos, with_grads, buffer_rows,
                             dtype, device, shuffle, part)
