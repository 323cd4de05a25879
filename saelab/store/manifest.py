"""A store's manifest: its schema, the one place a manifest is built, and its reader.

``manifest.json`` (one per store folder) lists only complete shards::

    {format_version, model, hook, d_in, dtype, context_size, bos_included, seed,
     dataset: {name, split, text_column}, n_tokens, holdout_shards: [files], has_grads,
     head_layout (hook_z only: {n_heads, d_head}), shards: [{file, rows, first_row, sha256}], complete}

Row r (global, in manifest order) is position ``r % context_size`` of sequence ``r // context_size``;
every shard holds whole contexts.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from saelab.errors import SaelabError
from saelab.fs import read_text
from saelab.layout import MANIFEST, is_plain_name

FORMAT_VERSION = 1
MANIFEST_KEYS = (
    "format_version", "model", "hook", "d_in", "dtype", "context_size", "bos_included", "seed",
    "dataset", "n_tokens", "holdout_shards", "has_grads", "head_layout", "shards",
)


#: a store's dtype name → the numpy dtype its shards hold
DTYPES = {"float32": np.float32, "float16": np.float16}


def new_manifest(*, model: str, hook: str, d_in: int, dtype: str, context_size: int, bos_included: bool, seed: int,
                 dataset: dict, has_grads: bool, head_layout: dict | None, n_contexts_planned: int,
                 tokenizer_bos: int | None, model_info: dict | None) -> dict:
    """The manifest of a store about to be written (no shard yet, ``complete`` false): harvest and synthetic
    stores alike."""
    return {"format_version": FORMAT_VERSION, "model": model, "hook": hook, "d_in": d_in, "dtype": dtype,
            "context_size": context_size, "bos_included": bos_included, "seed": seed, "dataset": dataset,
            "n_tokens": 0, "holdout_shards": [], "has_grads": has_grads, "head_layout": head_layout, "shards": [],
            "complete": False, "n_contexts_planned": n_contexts_planned, "tokenizer_bos": tokenizer_bos,
            "model_info": model_info}


def read_manifest(folder: pathlib.Path) -> dict:
    path = pathlib.Path(folder) / MANIFEST
    try:
        m = json.loads(read_text(path))
    except FileNotFoundError:
        raise SaelabError(f"{folder} holds no {MANIFEST}: pass a store folder written by `saelab harvest`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    if not isinstance(m["shards"], list) or not isinstance(m["holdout_shards"], list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and is_plain_name(s["file"])
            and isinstance(s.get("rows"), int) and not isinstance(s.get("rows"), bool) and s["rows"] >= 0
            for s in m["shards"]):
        bad.append("shards")
    elif not {f for f in m["holdout_shards"] if isinstance(f, str)} <= {s["file"] for s in m["shards"]} \
            or not all(isinstance(f, str) for f in m["holdout_shards"]):
        bad.append("holdout_shards")
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
