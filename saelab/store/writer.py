"""Writing a store: each shard enters the manifest only when complete (temp name, fsync, rename)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import pathlib

import h5py
import numpy as np

from saelab import interrupts
from saelab.errors import SaelabError
from saelab.fs import atomic_write_bytes, atomic_write_text, write_error
from saelab.layout import MANIFEST, shard_name
from saelab.store.manifest import read_manifest


def plan_shards(n_contexts: int, holdout: float, shard_contexts: int) -> list[tuple[int, int, bool]]:
    """[(first context, n contexts, is_holdout)]: training shards, then the held-out ones."""
    n_hold = math.ceil(holdout * n_contexts) if holdout > 0 else 0
    n_train = n_contexts - n_hold
    if n_train < 1:
        raise SaelabError(f"--holdout {holdout} leaves no training contexts out of {n_contexts}: lower it")
    plan = [(a, min(shard_contexts, n_train - a), False) for a in range(0, n_train, shard_contexts)]
    plan += [(a, min(shard_contexts, n_contexts - a), True) for a in range(n_train, n_contexts, shard_contexts)]
    return plan


class ShardWriter:
    """Writes the shards and manifest of one store; each shard enters the manifest complete."""

    def __init__(self, folder: pathlib.Path, manifest: dict):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.save_manifest()

    @classmethod
    def resume(cls, folder: pathlib.Path, keep_shards: int) -> ShardWriter:
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
        try:
            atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")
        except OSError as e:
            raise write_error(self.folder / MANIFEST, e) from None

    def write_shard(self, activations: np.ndarray, tokens: np.ndarray, grads: np.ndarray | None = None,
                    holdout: bool = False) -> dict:
        rows, d_in = activations.shape
        ctx = self.manifest["context_size"]
        assert tokens.shape == (rows // ctx, ctx) and rows % ctx == 0, "shards hold whole contexts"
        name = shard_name(len(self.manifest["shards"]))
        chunk_rows = max(1, min(rows, (1 << 20) // (d_in * activations.itemsize)))
        final = self.folder / name
        # the HDF5 image is built in memory and written by Python: a full disk or a file-size limit is an OSError
        # here (the temp file removed), where HDF5 writing to the file itself fails inside its own cleanup; a
        # Ctrl-C or SIGTERM is held while h5py builds it, and raised after (not inside h5py, which would garble it)
        image = io.BytesIO()
        with interrupts.held(), h5py.File(image, "w", libver=("earliest", "v110")) as f:
            f.create_dataset("activations", data=activations, chunks=(chunk_rows, d_in))
            f.create_dataset("tokens", data=tokens.astype(np.int32, copy=False))
            if grads is not None:
                f.create_dataset("grads", data=grads, chunks=(chunk_rows, d_in))
        data = image.getbuffer()
        try:
            atomic_write_bytes(final, data)
        except OSError as e:
            raise write_error(final, e) from None
        entry = {"file": name, "rows": rows, "first_row": self.manifest["n_tokens"],
                 "sha256": hashlib.sha256(data).hexdigest()}
        del data, image
        self.manifest["shards"].append(entry)
        self.manifest["n_tokens"] += rows
        if holdout:
            self.manifest["holdout_shards"].append(name)
        self.save_manifest()
        return entry

    def finish(self) -> None:
        self.manifest["complete"] = True
        self.save_manifest()
