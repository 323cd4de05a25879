"""Attribution graphs over MLP transcoders (Ameisen et al. 2025): the local replacement model of a prompt, the
direct effects between its features, errors, embeddings and logits, pruning by influence, the replacement and
completeness scores, the graph file, and interventions through the real model.

``attribute(model, transcoders, prompt)`` is what ``saelab attribute`` runs (``trace``, the costly unpruned graph,
then ``graph_file``, its pruning and file at given thresholds); the parts are in ``replacement``
(the linearised model), ``attribute`` (the graph), ``prune`` (influence, pruning, scores), ``file``
(``graph.json``) and ``coders`` (loading transcoders, interventions).
"""

from __future__ import annotations

from saelab.analysis.graphs.attribute import Graph, build_graph, select_logits
from saelab.analysis.graphs.coders import Transcoders, check_model, intervene, load_transcoders
from saelab.analysis.graphs.file import GRAPH_SCHEMA, graph_json, load_graph, write_graph
from saelab.analysis.graphs.prune import Pruned, influence, prune, scores
from saelab.options import AttributeOptions

__all__ = ["GRAPH_SCHEMA", "Graph", "Pruned", "Transcoders", "attribute", "build_graph", "check_model", "graph_file",
           "graph_json", "influence", "intervene", "load_graph", "load_transcoders", "prune", "scores", "select_logits",
           "trace", "write_graph"]


def trace(model, tc: Transcoders, prompt, *, max_logits: int = AttributeOptions.max_logits,
          logit_prob: float = AttributeOptions.logit_prob, batch_size: int = AttributeOptions.batch_size,
          max_features: int | None = AttributeOptions.max_features, progress: bool = False) -> Graph:
    """The unpruned Graph of ``prompt`` (text or token ids, BOS first; at most the model's context): the costly part
    of ``attribute``, independent of the pruning thresholds."""
    from saelab.analysis.steering import _tokens

    check_model(model, tc)
    toks = _tokens(model, prompt, verb="attribute").to(next(model.parameters()).device)[0]
    text = prompt if isinstance(prompt, str) else model.to_string(toks)
    return build_graph(model, tc.coders, text, toks, max_logits=max_logits, logit_prob=logit_prob,
                       batch_size=batch_size, max_features=max_features, progress=progress)


def graph_file(g: Graph, tc: Transcoders, node_threshold: float = AttributeOptions.node_threshold,
               edge_threshold: float = AttributeOptions.edge_threshold):
    """(the pruning, the scores, the graph file's content) of a traced Graph at these thresholds."""
    p = prune(g, node_threshold, edge_threshold)
    sc = scores(g)
    meta = {"model": tc.model, "saes": str(tc.path), "transcoders": {str(L): str(f) for L, f in tc.folders.items()}}
    return p, sc, graph_json(g, p, sc, node_threshold, edge_threshold, meta)


def attribute(model, tc: Transcoders, prompt, *, node_threshold: float = AttributeOptions.node_threshold,
              edge_threshold: float = AttributeOptions.edge_threshold, max_logits: int = AttributeOptions.max_logits,
              logit_prob: float = AttributeOptions.logit_prob, batch_size: int = AttributeOptions.batch_size,
              max_features: int | None = AttributeOptions.max_features, progress: bool = False):
    """(the unpruned Graph, the pruning, the scores, the graph file's content) of ``prompt`` (text or token ids,
    BOS first; at most the model's context): ``trace``, then ``graph_file``."""
    g = trace(model, tc, prompt, max_logits=max_logits, logit_prob=logit_prob, batch_size=batch_size,
              max_features=max_features, progress=progress)
    return (g, *graph_file(g, tc, node_threshold, edge_threshold))
