"""Activation stores: HDF5 shards + ``manifest.json``, written atomically, read as a stream.

Layout of one store (one hook), e.g. ``activations/demo/blocks.1.hook_resid_post/``::

    manifest.json        the schema below; lists only complete shards
    shard_00000.h5       activations [rows, d_in], tokens [rows/ctx, ctx] int32, grads [rows, d_in]?
    shard_00001.h5 ...

Row r (global, in manifest order) is position ``r % context_size`` of sequence
``r // context_size``; every shard holds whole contexts. Files appear only complete (temp
name → fsync → rename) and their sha256 is checked the first time a reader opens them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from saelab import SaelabError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_KEYS = (
    "format_version", "model", "hook", "d_in", "dtype", "context_size", "bos_included", "seed",
    "dataset", "n_tokens", "holdout_shards", "has_grads", "head_layout", "shards",
)


# ------------------------------------------------------------------------ memory
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


# ------------------------------------------------------------------------ file safety
def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_empty_folder_left(folder: str | os.PathLike):
    """Run the body; if it raises, remove the folders it created at or under ``folder`` (its missing
    parents included) that are still empty, so a run failing before it wrote anything leaves no trace.
    A folder that held anything beforehand is never touched; ``rmdir`` removes only empty folders."""
    folder = pathlib.Path(folder).expanduser().absolute()
    top, keep_top = None, False
    p = folder
    while not p.exists() and p != p.parent:  # the topmost folder this run may create
        top, p = p, p.parent
    if top is None and folder.is_dir() and not any(folder.iterdir()):
        top, keep_top = folder, True  # it existed, empty: remove only what is created inside it
    try:
        yield
    except BaseException:
        if top is not None and top.is_dir():
            for dirpath, _, _ in os.walk(top, topdown=False):
                if keep_top and pathlib.Path(dirpath) == top:
                    continue
                try:
                    os.rmdir(dirpath)
                except OSError:  # not empty (or not ours to remove): keep it
                    pass
        raise


def fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_name(path: pathlib.Path) -> pathlib.Path:
    """The hidden name a file is written under before its rename (``atomic_write_text``)."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write text to path so that readers see the old or the new file, never half of one."""
    path = pathlib.Path(path)
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _unwritable(flag: str, path: pathlib.Path, e: OSError) -> SaelabError:
    return SaelabError(f"{flag} {path} cannot be written ({e.strerror or e}): choose a file you can write")


def remove_contents(folder) -> None:
    """Delete everything inside ``folder`` (kept itself): what a failed run wrote into a folder it found empty."""
    folder = pathlib.Path(folder)
    for child in folder.iterdir() if folder.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def check_writable_in(folder, name: str) -> None:
    """Before a long pass that ends by writing ``folder/name`` (eval.json, features.h5): a one-line error now if
    it cannot be written there (a read-only folder, a folder in the file's place), not a traceback after the work."""
    target = pathlib.Path(folder).expanduser() / name
    if target.is_dir():
        raise SaelabError(f"{target} is a folder where this writes a file: move it away")
    tmp = temp_name(target)
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        raise SaelabError(f"{target} cannot be written ({e.strerror or e}): make {target.parent} writable, or "
                          "copy the SAE folder somewhere you can write") from None


def check_output(path, flag: str = "--out", example: str = "out.json") -> pathlib.Path:
    """A command's output file, checked before its work: not a folder, its folder made, and writable (its temp
    name created and removed); a one-line SaelabError naming ``flag`` otherwise."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise SaelabError(f"{flag} {path} is a folder: pass a file name, e.g. {path / example}")
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        raise _unwritable(flag, path, e) from None
    return path


def write_output(path, text: str, flag: str = "--out") -> pathlib.Path:
    """``atomic_write_text`` for a command's output file (its folder made); an OSError is a one-line
    SaelabError naming ``flag``, with no temp file left."""
    path = pathlib.Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as e:
        temp_name(path).unlink(missing_ok=True)
        raise _unwritable(flag, path, e) from None
    return path


def finite_json(obj):
    """``obj`` with every NaN / inf float as None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def sha256_file(path: pathlib.Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.h5"


def read_manifest(folder: pathlib.Path) -> dict:
    path = pathlib.Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaelabError(f"{folder} holds no {MANIFEST}: pass a store folder written by `saelab harvest`") from None
    except json.JSONDecodeError as e:
        raise SaelabError(f"{path} is not valid JSON ({e}): restore it or harvest the store again") from None
    if not isinstance(m, dict):
        raise SaelabError(f"{path} is not a store manifest (a JSON object): restore it or harvest the store again")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise SaelabError(f"{path} lacks {', '.join(missing)}: it was not written by this saelab; harvest again")
    bad = [k for k in ("format_version", "d_in", "context_size", "n_tokens")
           if isinstance(m[k], bool) or not isinstance(m[k], int) or m[k] < (0 if k == "n_tokens" else 1)]
    if m.get("dtype") not in ("float32", "float16", "bfloat16"):
        bad.append("dtype")
    if not isinstance(m["shards"], list) or not isinstance(m["holdout_shards"], list):
        bad.append("shards")
    if bad:
        raise SaelabError(f"{path} has a bad {', '.join(bad)} ({', '.join(repr(m.get(k)) for k in bad)}): restore it "
                          "or harvest the store again")
    if m["format_version"] > FORMAT_VERSION:
        raise SaelabError(f"{path} has format {m['format_version']}, newer than this saelab: upgrade saelab")
    return m


def check_complete(store: pathlib.Path) -> pathlib.Path:
    """The store folder, if its writer finished; an interrupted harvest's store is refused."""
    if read_manifest(store).get("complete") is False:
        raise SaelabError(f"store {store} is incomplete (its writer was interrupted or is still running): finish it "
                          "with `saelab harvest --resume` and the same flags, or write it again")
    return store


def resolve_stores(path: str | os.PathLike, hook: str | None = None) -> list[pathlib.Path]:
    """Store folders for ``--activations``: a store folder itself, or a RUN folder's stores."""
    p = pathlib.Path(path)
    if not p.exists():
        raise SaelabError(f"--activations {p}: no such folder; harvest first (saelab harvest --out {p} ...)")
    if not p.is_dir():
        raise SaelabError(f"--activations {p} is a file: pass a store folder or a RUN folder written by saelab harvest")
    if (p / MANIFEST).exists():
        if hook is not None and read_manifest(p)["hook"] != hook:
            raise SaelabError(f"store {p} holds hook {read_manifest(p)['hook']}, not {hook}")
        return [check_complete(p)]
    stores = sorted(d for d in p.iterdir() if (d / MANIFEST).exists())
    if not stores:
        raise SaelabError(f"{p} holds no store (no */{MANIFEST}): pass a folder written by `saelab harvest`")
    if hook is not None:
        picked = [d for d in stores if d.name == hook]
        if not picked:
            raise SaelabError(f"{p} has no store for hook {hook}; it has {', '.join(d.name for d in stores)}")
        stores = picked
    return [check_complete(d) for d in stores]


def store_for_sae(sae_dir: str | os.PathLike, sae, activations: str | os.PathLike | None = None,
                  required: bool = True) -> "ActivationStore | None":
    """The store an SAE is evaluated or analysed on: ``activations`` (a store folder, or a RUN
    folder whose store of the SAE's hook is taken), else the store its train.json names. Without
    either: a one-line error, or None when not ``required``. A store of another hook or width, or
    a RUN folder of several stores for an SAE that names no hook, is refused."""
    from saelab.config import TRAIN_FILE

    sae_dir = pathlib.Path(sae_dir)
    hook = sae.cfg.hook_name or None
    if activations is None:
        try:
            activations = json.loads((sae_dir / TRAIN_FILE).read_text())["store"]
        except (OSError, ValueError, KeyError, TypeError):
            if not required:
                return None
            model = getattr(sae.cfg, "model_name", "") or ""
            hint = (f" (harvest one with: saelab harvest --model {model} --hook {hook} --out activations/NAME)"
                    if model and hook else "")
            raise SaelabError(f"{sae_dir} has no {TRAIN_FILE} naming the store it was trained on: "
                              f"pass --activations STORE_OR_RUN{hint}") from None
        if not pathlib.Path(activations).exists():
            raise SaelabError(f"the store {activations} this SAE was trained on is gone: pass --activations STORE_OR_RUN")
    p = pathlib.Path(activations)
    # a store folder is taken as given (a hook or width mismatch is reported below); a RUN folder by hook
    stores = resolve_stores(p, None if (p / MANIFEST).exists() else hook)
    if len(stores) > 1:
        raise SaelabError(f"{p} holds {len(stores)} stores and the SAE names no hook: pass one store folder")
    store = ActivationStore(stores[0])
    if store.d_in != sae.d_in or (hook and store.hook != hook):
        raise SaelabError(f"store {store.path} holds {store.hook} (d_in {store.d_in}) but the SAE reads "
                          f"{hook or '?'} (d_in {sae.d_in}): pass --activations with a store of the SAE's hook")
    return store


# ----------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes the shards and manifest of one store; each shard enters the manifest complete."""

    def __init__(self, folder: pathlib.Path, manifest: dict):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.save_manifest()

    @classmethod
    def resume(cls, folder: pathlib.Path, keep_shards: int) -> "ShardWriter":
        """Reopen a store, keeping its first ``keep_shards`` complete shards, deleting the rest."""
        m = read_manifest(folder)
        m["shards"] = m["shards"][:keep_shards]
        kept = {s["file"] for s in m["shards"]}
        m["holdout_shards"] = [f for f in m["holdout_shards"] if f in kept]
        m["n_tokens"] = sum(s["rows"] for s in m["shards"])
        m["complete"] = False
        for f in pathlib.Path(folder).iterdir():
            if (f.name.startswith("shard_") and f.name not in kept) or f.name.endswith(".tmp"):
                f.unlink()
        return cls(folder, m)

    def save_manifest(self) -> None:
        atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    def write_shard(self, activations: np.ndarray, tokens: np.ndarray, grads: np.ndarray | None = None,
                    holdout: bool = False) -> dict:
        rows, d_in = activations.shape
        ctx = self.manifest["context_size"]
        assert tokens.shape == (rows // ctx, ctx) and rows % ctx == 0, "shards hold whole contexts"
        name = shard_name(len(self.manifest["shards"]))
        tmp = temp_name(self.folder / name)
        chunk_rows = max(1, min(rows, (1 << 20) // (d_in * activations.itemsize)))
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            f.create_dataset("activations", data=activations, chunks=(chunk_rows, d_in))
            f.create_dataset("tokens", data=tokens.astype(np.int32, copy=False))
            if grads is not None:
                f.create_dataset("grads", data=grads, chunks=(chunk_rows, d_in))
        fsync_file(tmp)
        final = self.folder / name
        os.replace(tmp, final)
        fsync_dir(self.folder)
        entry = {"file": name, "rows": rows, "first_row": self.manifest["n_tokens"], "sha256": sha256_file(final)}
        self.manifest["shards"].append(entry)
        self.manifest["n_tokens"] += rows
        if holdout:
            self.manifest["holdout_shards"].append(name)
        self.save_manifest()
        return entry

    def finish(self) -> None:
        self.manifest["complete"] = True
        self.save_manifest()


# ----------------------------------------------------------------------------- reading
@dataclass
class _Block:
    shard: int  # index into store.shards
    start: int  # row within the shard
    stop: int


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
                f = h5py.File(path, "r")
            except OSError as e:
                raise SaelabError(f"shard {path} cannot be opened ({e}): delete the store and harvest it again") from None
            if "activations" not in f:
                f.close()
                raise SaelabError(f"shard {path} holds no 'activations' dataset: delete the store and harvest it again")
            if f["activations"].shape != (shard["rows"], self.d_in):
                raise SaelabError(f"shard {path} has shape {f['activations'].shape}, manifest says "
                                  f"({shard['rows']}, {self.d_in}): harvest the store again")
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
        out = np.empty((len(row_ids), self.d_in), dtype=np.dtype(self.manifest["dtype"]))
        for i in np.unique(shard_idx):
            sel = np.nonzero(shard_idx == i)[0]
            order = np.argsort(local[sel])
            ds = self._file(int(i))[what]
            out[sel[order]] = ds[np.sort(local[sel])]  # h5py wants increasing indices
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


class BatchIterator:
    """Shuffled batches over a store; ``state_dict()`` captures (epoch, position, served).

    Each epoch's row order is a pure function of (seed, epoch): blocks of whole contexts
    (~4k rows) are permuted across all shards, grouped into buffers of ``buffer_rows``, and
    rows are permuted within each buffer. Batches are consecutive slices of the endless
    sequence of epochs, so a resumed iterator serves exactly the batches it would have.
    """

    def __init__(self, store: ActivationStore, batch_size, split, tokens, seed, skip_bos, with_grads,
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
        elif perm is not None:  # torch's row gather is several times faster than numpy fancy indexing
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
