"""A store's manifest: its schema, the one place a manifest is built, and its reader.

``manifest.json`` (one per store folder) lists only complete shards::

    {format_version, model, hook, d_in, dtype, context_size, bos_included, seed,
     dataset: {name, split, text_column}, n_tokens, holdout_shards: [files], has_grads,
     head_layout (hook_z only: {n_heads, d_head}), shards: [{file, rows, first_row, sha256}], complete,
     pairs (paired stores only: [{input, target}])}

Row r (global, in manifest order) is position ``r % context_size`` of sequence ``r // context_size``;
every shard holds whole contexts.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from saelab.errors import SaelabError
from saelab.layout import MANIFEST, PAIR_SCHEMA
from saelab.schema import BOOL, PLAIN_NAME, POSITIVE, TEXT, WHOLE, nullable, obj, read_json

FORMAT_VERSION = 1
MANIFEST_KEYS = (
    "format_version", "model", "hook", "d_in", "dtype", "context_size", "bos_included", "seed",
    "dataset", "n_tokens", "holdout_shards", "has_grads", "head_layout", "shards",
)


#: a store's dtype name → the numpy dtype its shards hold
DTYPES = {"float32": np.float32, "float16": np.float16}


def new_manifest(*, model: str, hook: str, d_in: int, dtype: str, context_size: int, bos_included: bool, seed: int,
                 dataset: dict, has_grads: bool, head_layout: dict | None, n_contexts_planned: int,
                 tokenizer_bos: int | None, model_info: dict | None, pairs: list[dict] | None = None) -> dict:
    """The manifest of a store about to be written (no shard yet, ``complete`` false): harvest and synthetic
    stores alike. ``pairs``: the transcoder pairs [{"input": hook, "target": hook}] the store belongs to, in either
    role (its partners are the stores of the same RUN folder named by those hooks); a store of no pair has no
    ``pairs`` key."""
    m = {"format_version": FORMAT_VERSION, "model": model, "hook": hook, "d_in": d_in, "dtype": dtype,
         "context_size": context_size, "bos_included": bos_included, "seed": seed, "dataset": dataset,
         "n_tokens": 0, "holdout_shards": [], "has_grads": has_grads, "head_layout": head_layout, "shards": [],
         "complete": False, "n_contexts_planned": n_contexts_planned, "tokenizer_bos": tokenizer_bos,
         "model_info": model_info}
    if pairs:
        m["pairs"] = [{"input": p["input"], "target": p["target"]} for p in pairs]
    return m


SHARD_SCHEMA = obj({"file": PLAIN_NAME, "rows": WHOLE, "first_row": WHOLE, "sha256": TEXT},
                   required=("file", "rows", "first_row", "sha256"))
#: manifest.json, field by field (the keys of ``MANIFEST_KEYS`` required)
MANIFEST_SCHEMA = obj({
    "format_version": POSITIVE, "model": TEXT, "hook": TEXT, "d_in": POSITIVE,
    "dtype": {"enum": list(DTYPES)}, "context_size": POSITIVE, "bos_included": BOOL,
    "seed": {"type": "integer"}, "dataset": {"type": "object"}, "n_tokens": WHOLE,
    "holdout_shards": {"type": "array", "items": PLAIN_NAME}, "has_grads": BOOL,
    "head_layout": nullable(obj({"n_heads": POSITIVE, "d_head": POSITIVE}, required=("n_heads", "d_head"))),
    "shards": {"type": "array", "items": SHARD_SCHEMA}, "complete": BOOL, "n_contexts_planned": WHOLE,
    "tokenizer_bos": nullable({"type": "integer"}), "model_info": nullable({"type": "object"}),
    "pairs": {"type": "array", "items": PAIR_SCHEMA, "minItems": 1,
              "description": "the transcoder pairs this store belongs to, as input or target (paired stores only)"},
}, required=MANIFEST_KEYS)


def read_manifest(folder: pathlib.Path) -> dict:
    """A store's manifest, held to ``MANIFEST_SCHEMA`` and then to ``layout_problem`` (its fields agreeing with
    each other): a missing, damaged or foreign one is a one-line error naming the file and the field."""
    path = pathlib.Path(folder) / MANIFEST
    fix = "restore it or harvest the store again"
    try:
        m = read_json(path, MANIFEST_SCHEMA, "store manifest", fix)
    except FileNotFoundError:
        raise SaelabError(f"{folder} holds no {MANIFEST}: pass a store folder written by `saelab harvest`") from None
    if m["format_version"] > FORMAT_VERSION:
        raise SaelabError(f"{path} has format {m['format_version']}, newer than this saelab: upgrade saelab")
    why = layout_problem(m)
    if why:
        raise SaelabError(f"{path} is not a valid store manifest: {why}; {fix}")
    return m


def layout_problem(m: dict) -> str | None:
    """The first way a schema-valid manifest's fields disagree with each other, as "FIELD: what is wrong" (None
    when they agree). Every store saelab writes keeps these, complete or not (``ShardWriter`` appends a shard at
    ``first_row = n_tokens`` and adds its rows; a resume and harvest's merge renumber the same way), and every
    reader relies on them: rows are located by ``first_row``, contexts by ``context_size``, sizes by ``n_tokens``."""
    ctx, seen, at = m["context_size"], set(), 0
    for i, s in enumerate(m["shards"]):
        if s["file"] in seen:
            return f"shards[{i}].file: {s['file']!r} is listed twice"
        seen.add(s["file"])
        if s["first_row"] != at:
            return f"shards[{i}].first_row: {s['first_row']} is not {at}, the rows of the shards before it"
        if s["rows"] % ctx:
            return f"shards[{i}].rows: {s['rows']} is not a whole number of contexts of context_size {ctx}"
        at += s["rows"]
    if m["n_tokens"] != at:
        return f"n_tokens: {m['n_tokens']} is not {at}, the rows of its shards"
    stray = sorted(set(m["holdout_shards"]) - seen)
    if stray:
        return f"holdout_shards: {stray[0]!r} is not one of its shards"
    for i, pair in enumerate(m.get("pairs", ())):  # a store records only the pairs it is one side of
        if m["hook"] not in (pair["input"], pair["target"]) or pair["input"] == pair["target"]:
            return f"pairs[{i}]: {pair['input']} → {pair['target']} is not a pair of two hooks, one its hook {m['hook']}"
    return None


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
