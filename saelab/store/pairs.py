"""Paired stores: the two stores a transcoder trains on (one hook read, another reconstructed), row for row.

A harvest writes every store of a RUN folder in one pass (one shard plan, one token stream), so two stores of
one run hold the same contexts in the same rows. Each store's manifest lists the pairs it belongs to
(``pairs``: [{"input": hook, "target": hook}]); the partner of a store is the store folder beside it named by
the other hook. ``paired_stores`` finds the pairs of what ``--activations`` names; ``check_aligned`` holds two
stores to row alignment before a trainer reads them together.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from saelab.errors import SaelabError
from saelab.hooks import hook_layer
from saelab.layout import MANIFEST
from saelab.store.manifest import check_complete, read_manifest, resolve_stores
from saelab.store.reader import ActivationStore

#: how a pair is harvested so that its stores are row-aligned
ALIGN_FIX = "harvest both hooks in one run with --pair IN_HOOK:OUT_HOOK"


def _no_pairs(path: pathlib.Path) -> SaelabError:
    return SaelabError(f"{path} holds no paired stores: harvest with --pairs mlp or --pair IN_HOOK:OUT_HOOK")


def _partner(run: pathlib.Path, hook: str, recorded_by: pathlib.Path) -> pathlib.Path:
    """The complete store of ``hook`` in the RUN folder ``run``, which the store ``recorded_by`` names as its
    partner."""
    folder = run / hook
    if not (folder / MANIFEST).is_file():
        raise SaelabError(f"store {recorded_by} is paired with {hook}, but {folder} holds no store: restore it, or "
                          f"{ALIGN_FIX}")
    got = read_manifest(check_complete(folder))["hook"]
    if got != hook:
        raise SaelabError(f"store {folder} holds hook {got}, not {hook} its folder and its partner {recorded_by} "
                          f"name: restore it, or {ALIGN_FIX}")
    return folder


def paired_stores(path: str | os.PathLike) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(input store folder, target store folder) of each pair that ``path`` names: a RUN folder gives every pair its
    stores record, in the order of the input hook's layer, then the input and target hooks' names; a store folder
    gives its one pair, of which it is the input. Each store is complete (and its folder holds the hook it is named
    by); a missing or incomplete partner, or a path with no pair, is a one-line error."""
    p = pathlib.Path(path).expanduser()
    stores = resolve_stores(p)  # the store itself, or every store of the RUN folder: each complete
    if (p / MANIFEST).exists():
        m = read_manifest(p)
        if not m.get("pairs"):
            raise _no_pairs(p)
        mine = [r["target"] for r in m["pairs"] if r["input"] == m["hook"]]
        if not mine:
            src = m["pairs"][0]["input"]
            raise SaelabError(f"store {p} is the target of a pair, not an input: pass its input store {p.parent / src} "
                              f"or the RUN folder {p.parent}")
        if len(mine) > 1:
            raise SaelabError(f"store {p} is the input of {len(mine)} pairs ({', '.join(mine)}): pass the RUN folder "
                              f"{p.parent} to take them all")
        return [(p, _partner(p.parent, mine[0], p))]
    recorded: dict[tuple[str, str], pathlib.Path] = {}  # each pair once, though both of its stores record it
    for s in stores:
        for r in read_manifest(s).get("pairs", ()):
            recorded.setdefault((r["input"], r["target"]), s)

    def order(pair):
        layer = hook_layer(pair[0])
        return (-1 if layer is None else layer, *pair)

    if not recorded:
        raise _no_pairs(p)
    return [(_partner(p, a, by), _partner(p, b, by)) for (a, b), by in sorted(recorded.items(), key=lambda kv:
                                                                               order(kv[0]))]


def check_aligned(input_store: str | os.PathLike, target_store: str | os.PathLike) -> None:
    """Hold two stores to row alignment: row r of one is row r of the other (the same token at the same position of
    the same context). Both are complete, of one model, dataset, seed and context size, with as many rows in the same
    shards (rows and ``first_row``, in order), the same held-out shards, and the same tokens shard by shard;
    otherwise a one-line error naming both folders and the first difference. Shard checksums are left to the reader
    that serves their rows."""
    a, b = (pathlib.Path(s).expanduser() for s in (input_store, target_store))
    ma, mb = (read_manifest(check_complete(s)) for s in (a, b))

    def differ(what: str) -> SaelabError:
        return SaelabError(f"stores {a} and {b} are not row-aligned: {what}; {ALIGN_FIX}")

    for key in ("model", "dataset", "seed", "context_size", "bos_included", "n_tokens"):
        if ma[key] != mb[key]:
            raise differ(f"{key} {ma[key]!r} vs {mb[key]!r}")
    sa, sb = ma["shards"], mb["shards"]
    if len(sa) != len(sb):
        raise differ(f"{len(sa)} shards vs {len(sb)}")
    for i, (x, y) in enumerate(zip(sa, sb)):
        if (x["rows"], x["first_row"]) != (y["rows"], y["first_row"]):
            raise differ(f"shard {i} holds rows {x['first_row']}+{x['rows']} vs {y['first_row']}+{y['rows']}")
    held_a, held_b = ([i for i, s in enumerate(sh) if s["file"] in m["holdout_shards"]]
                      for sh, m in ((sa, ma), (sb, mb)))
    if held_a != held_b:
        raise differ(f"held-out shards {held_a} vs {held_b}")
    ctx = ma["context_size"]
    ra, rb = ActivationStore(a, verify=False), ActivationStore(b, verify=False)
    try:
        for i, x in enumerate(sa):
            n = x["rows"] // ctx
            try:
                ta, tb = ra.read(i, 0, n, "tokens"), rb.read(i, 0, n, "tokens")
            except KeyError:
                raise SaelabError(f"a shard {i} of {a} or {b} holds no 'tokens' dataset: harvest the store again"
                                  ) from None
            if not np.array_equal(ta, tb):
                raise differ(f"shard {i} ({x['file']} / {sb[i]['file']}) holds other tokens")
    finally:
        ra.close()
        rb.close()
