"""The circuit file (``GROUP/circuits/NAME.json``): its kind and format version, writing it, and reading
it back with every check a reader relies on (the app's Circuits page reads it here)."""

from __future__ import annotations

import json
import pathlib

from saelab.errors import SaelabError
from saelab.fs import read_text
from saelab.outputs import write_report

FORMAT_VERSION = 1
KIND = "sparse_feature_circuit"


def write_circuit(circuit: dict, path) -> pathlib.Path:
    """The circuit as JSON (NaN as null), atomically; its folder made."""
    return write_report(path, circuit, "circuit", indent=1)


def _number_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def load_circuit(path) -> dict:
    """Read and validate a circuit file; SaelabError naming the problem."""
    path = pathlib.Path(path).expanduser()
    try:
        c = json.loads(read_text(path))
    except OSError as e:
        raise SaelabError(f"cannot read circuit file {path} ({e.strerror}): run saelab circuit first") from None
    except ValueError as e:
        raise SaelabError(f"{path} is not valid JSON ({e}): re-run saelab circuit") from None

    def bad(why):
        return SaelabError(f"{path} is not a circuit file: {why}; re-run saelab circuit")

    if not isinstance(c, dict) or c.get("kind") != KIND:
        raise bad(f'"kind" must be "{KIND}"')
    if c.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {c.get('format_version')!r} (this saelab reads {FORMAT_VERSION})")
    for key, typ in [("model", str), ("hooks", list), ("saes", dict), ("task", dict), ("method", str),
                     ("nodes", list), ("edges", list), ("faithfulness", dict), ("node_threshold", (int, float)),
                     ("edge_threshold", (int, float))]:
        if not isinstance(c.get(key), typ):
            raise bad(f"missing or mistyped {key!r}")
    if not all(isinstance(h, str) for h in c["hooks"]) or not all(isinstance(v, str) for v in c["saes"].values()):
        raise bad("hooks must be hook names and saes map hooks to folders")
    for key in ("name", "metric"):
        if key in c["task"] and not isinstance(c["task"][key], str):
            raise bad(f"task {key} must be text")
    for group in ("faithfulness", "metric_values"):
        values = c.get(group) or {}
        if not isinstance(values, dict) or not all(_number_or_none(values.get(k)) for k in ("nodes", "edges", "full",
                                                                                           "empty", "circuit")):
            raise bad(f"{group} must map to numbers")
    ids = set()
    for i, nd in enumerate(c["nodes"]):
        if not isinstance(nd, dict) or not {"id", "hook", "layer", "kind", "latent", "effect"} <= set(nd):
            raise bad(f"node {i} lacks id/hook/layer/kind/latent/effect")
        if not isinstance(nd["id"], str) or not _number_or_none(nd["effect"]) or not (
                nd["layer"] is None or (isinstance(nd["layer"], int) and not isinstance(nd["layer"], bool))):
            raise bad(f"node {i}: id must be text, effect a number, layer a whole number")
        if nd["hook"] not in c["hooks"] or nd["kind"] not in ("latent", "error"):
            raise bad(f"node {nd['id']!r} has hook {nd['hook']!r} / kind {nd['kind']!r}")
        if (nd["kind"] == "latent") != isinstance(nd["latent"], int):
            raise bad(f"node {nd['id']!r}: latent nodes need an integer latent, error nodes null")
        ids.add(nd["id"])
    for i, ed in enumerate(c["edges"]):
        if not isinstance(ed, dict) or not {"src", "dst", "weight"} <= set(ed):
            raise bad(f"edge {i} lacks src/dst/weight")
        if not isinstance(ed["src"], str) or not isinstance(ed["dst"], str) or not _number_or_none(ed["weight"]):
            raise bad(f"edge {i}: src and dst must be node ids, weight a number")
        if ed["src"] not in ids or ed["dst"] not in ids:
            raise bad(f"edge {ed['src']!r} → {ed['dst']!r} names a node that is not in the circuit")
    return c
