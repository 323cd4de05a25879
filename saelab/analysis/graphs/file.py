"""The attribution graph file (``graph.json``): its schema, writing a pruned graph, reading one back.

The file holds the pruned graph: the kept nodes (each with its influence on the output, and its value and
constant part where it is a target), the kept edges (source → target, the direct effect), the replacement and
completeness scores of the whole graph, the prompt and what made it (model, transcoders, thresholds).
"""

from __future__ import annotations

import math
import pathlib

from saelab.analysis.graphs.attribute import EMBEDDING, ERROR, FEATURE, LOGIT, Graph
from saelab.analysis.graphs.prune import Pruned
from saelab.errors import SaelabError
from saelab.fs import finite_json
from saelab.outputs import write_report
from saelab.schema import NUMBER, TEXT, WHOLE, check, nullable, obj, read_json

FORMAT_VERSION = 1
KIND = "attribution_graph"
COMMAND = "attribute"

MAYBE_NUMBER = nullable(NUMBER)
NODE_SCHEMA = obj({
    "id": TEXT, "kind": {"enum": [FEATURE, ERROR, EMBEDDING, LOGIT]},
    "layer": {"type": "integer", "minimum": -1, "description": "the MLP layer; -1 for an embedding, n_layers for a "
                                                                "logit"},
    "position": WHOLE, "feature": nullable(WHOLE),
    "activation": MAYBE_NUMBER, "value": MAYBE_NUMBER, "bias": MAYBE_NUMBER, "influence": NUMBER,
    "token": TEXT, "prob": MAYBE_NUMBER,
}, required=("id", "kind", "layer", "position", "feature", "activation", "influence"))
EDGE_SCHEMA = obj({"source": TEXT, "target": TEXT, "weight": NUMBER}, required=("source", "target", "weight"))
#: graph.json, field by field
GRAPH_SCHEMA = obj({
    "kind": {"const": KIND}, "format_version": {"const": FORMAT_VERSION}, "prompt": TEXT,
    "tokens": {"type": "array", "items": TEXT}, "token_ids": {"type": "array", "items": WHOLE},
    "model": TEXT, "saes": TEXT, "n_layers": WHOLE,
    "transcoders": {"type": "object", "additionalProperties": TEXT},
    "nodes": {"type": "array", "items": NODE_SCHEMA}, "edges": {"type": "array", "items": EDGE_SCHEMA},
    "scores": obj({"replacement": NUMBER, "completeness": NUMBER}, required=("replacement", "completeness")),
    "node_threshold": NUMBER, "edge_threshold": NUMBER, "n_nodes_total": WHOLE, "n_edges_total": WHOLE,
    "linearization_error": NUMBER,
}, required=("kind", "format_version", "prompt", "tokens", "nodes", "edges", "scores", "node_threshold",
             "edge_threshold"))


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def graph_json(g: Graph, pruned: Pruned, scores: dict, node_threshold: float, edge_threshold: float,
               meta: dict) -> dict:
    """The file's content: the kept nodes and edges of ``g`` under ``pruned``."""
    keep = pruned.node_mask.nonzero().squeeze(1).tolist()
    nodes = []
    for i in keep:
        n = {**g.nodes[i], "influence": float(pruned.node_influence[i]), "value": _num(float(g.value[i])),
             "bias": _num(float(g.bias[i]))}
        nodes.append({k: v for k, v in n.items() if v is not None or k in ("feature", "activation")})
    t, s = pruned.edge_mask.nonzero(as_tuple=True)
    edges = [{"source": g.nodes[b]["id"], "target": g.nodes[a]["id"], "weight": float(g.adjacency[a, b])}
             for a, b in zip(t.tolist(), s.tolist())]
    edges.sort(key=lambda e: -abs(e["weight"]))
    return {"kind": KIND, "format_version": FORMAT_VERSION, "prompt": g.prompt, "tokens": g.tokens,
            "token_ids": g.token_ids, "n_layers": g.n_layers, **meta, "nodes": nodes, "edges": edges,
            "scores": scores, "node_threshold": node_threshold, "edge_threshold": edge_threshold,
            "n_nodes_total": len(g.nodes), "n_edges_total": int((g.adjacency != 0).sum()),
            "linearization_error": g.linearization_error}


def write_graph(data: dict, path) -> pathlib.Path:
    """The graph file, atomically (its folder made), held first to the schema its readers hold it to."""
    check(finite_json(data), GRAPH_SCHEMA, path, "graph file", "this is a bug in saelab: please report it")
    return write_report(path, data, COMMAND, indent=1)


def load_graph(path) -> dict:
    """A graph file, held to ``GRAPH_SCHEMA`` and to what ties it together (node ids unique, every edge joins two of
    its nodes); SaelabError naming the file and the field."""
    path = pathlib.Path(path).expanduser()
    fix = "re-run saelab attribute"
    try:
        g = read_json(path, GRAPH_SCHEMA, "graph file", fix)
    except FileNotFoundError:
        raise SaelabError(f"cannot read graph file {path} (no such file): run saelab attribute first") from None
    ids = [n["id"] for n in g["nodes"]]
    if len(set(ids)) != len(ids):
        raise SaelabError(f"{path} is not a valid graph file: a node id is listed twice; {fix}")
    known = set(ids)
    for i, e in enumerate(g["edges"]):
        for end in ("source", "target"):
            if e[end] not in known:
                raise SaelabError(f"{path} is not a valid graph file: edges[{i}].{end} {e[end]!r} is not one of its "
                                  f"nodes; {fix}")
    return g
