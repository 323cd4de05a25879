"""The circuit file (``GROUP/circuits/NAME.json``): its kind and format version, writing it, and reading
it back with every check a reader relies on (the app's Circuits page reads it here)."""

from __future__ import annotations

import pathlib

from saelab.errors import SaelabError
from saelab.outputs import write_report
from saelab.fs import finite_json
from saelab.schema import NUMBER, TEXT, WHOLE, check, nullable, obj, read_json

FORMAT_VERSION = 1
KIND = "sparse_feature_circuit"


def write_circuit(circuit: dict, path) -> pathlib.Path:
    """The circuit as JSON (NaN as null), atomically; its folder made. It is held to the schema its readers hold
    it to before anything is written."""
    check(finite_json(circuit), CIRCUIT_SCHEMA, path, "circuit file", "this is a bug in saelab: please report it")
    return write_report(path, circuit, "circuit", indent=1)


MAYBE_NUMBER = nullable(NUMBER)
NODE_SCHEMA = obj({"id": TEXT, "hook": TEXT, "layer": nullable({"type": "integer"}), "kind": {"enum": ["latent", "error"]},
                   "latent": nullable(WHOLE), "effect": MAYBE_NUMBER},
                  required=("id", "hook", "layer", "kind", "latent", "effect"))
EDGE_SCHEMA = obj({"src": TEXT, "dst": TEXT, "weight": MAYBE_NUMBER}, required=("src", "dst", "weight"))
SWEEP_SCHEMA = {"type": "array", "items": obj({"threshold": MAYBE_NUMBER, "n_nodes": WHOLE, "n_latents": WHOLE,
                                               "n_edges": WHOLE, "faithfulness": MAYBE_NUMBER})}
#: a circuit file, field by field (an undefined number is null: the writer turns NaN into null)
CIRCUIT_SCHEMA = obj({
    "kind": {"const": KIND}, "format_version": {"const": FORMAT_VERSION}, "model": TEXT, "group": TEXT,
    "hooks": {"type": "array", "items": TEXT}, "saes": {"type": "object", "additionalProperties": TEXT},
    "task": obj({"name": TEXT, "metric": TEXT, "n_examples": WHOLE, "accuracy": MAYBE_NUMBER}),
    "method": TEXT, "ig_steps": nullable(WHOLE), "node_threshold": NUMBER, "edge_threshold": NUMBER,
    "nodes": {"type": "array", "items": NODE_SCHEMA}, "edges": {"type": "array", "items": EDGE_SCHEMA},
    "faithfulness": obj({"nodes": MAYBE_NUMBER, "edges": MAYBE_NUMBER, "node_sweep": SWEEP_SCHEMA,
                         "edge_sweep": SWEEP_SCHEMA}),
    "metric_values": nullable(obj({"full": MAYBE_NUMBER, "empty": MAYBE_NUMBER, "circuit": MAYBE_NUMBER})),
    "n_latents_total": WHOLE, "latent_fraction": MAYBE_NUMBER,
    "error_effects": {"type": "object", "additionalProperties": MAYBE_NUMBER},
}, required=("kind", "format_version", "model", "hooks", "saes", "task", "method", "nodes", "edges", "faithfulness",
             "node_threshold", "edge_threshold"))


def load_circuit(path) -> dict:
    """A circuit file, held to ``CIRCUIT_SCHEMA`` and to what ties its parts together (a node's hook is one of the
    circuit's hooks, a latent node has a latent and an error node none, an edge joins two of its nodes);
    SaelabError naming the file and the field."""
    path = pathlib.Path(path).expanduser()
    fix = "re-run saelab circuit"
    try:
        c = read_json(path, {"type": "object"}, "circuit file", fix)
    except FileNotFoundError:
        raise SaelabError(f"cannot read circuit file {path} (no such file): run saelab circuit first") from None

    def bad(why):
        return SaelabError(f"{path} is not a valid circuit file: {why}; {fix}")

    # what the file is, before what its fields hold: another file's fields would only mislead
    if c.get("kind") != KIND:
        raise bad(f"kind: {c.get('kind')!r} is not {KIND!r}")
    version = c.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise SaelabError(f"{path} has format {version}, newer than this saelab: upgrade saelab")
    check(c, CIRCUIT_SCHEMA, path, "circuit file", fix)

    ids = set()
    for i, nd in enumerate(c["nodes"]):
        if nd["hook"] not in c["hooks"]:
            raise bad(f"nodes[{i}].hook: {nd['hook']!r} is not one of the circuit's hooks")
        if (nd["kind"] == "latent") != (nd["latent"] is not None):
            raise bad(f"nodes[{i}].latent: a latent node needs a latent id, an error node null")
        ids.add(nd["id"])
    for i, ed in enumerate(c["edges"]):
        if ed["src"] not in ids or ed["dst"] not in ids:
            raise bad(f"edges[{i}]: {ed['src']!r} → {ed['dst']!r} names a node that is not in the circuit")
    return c
