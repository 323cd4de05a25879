"""Pruning an attribution graph by influence, and its replacement and completeness scores.

The definitions are circuit-tracer's (Ameisen et al. 2025, "Circuit Tracing"), over the absolute direct effects
with each target's incoming effects normalised to sum to 1 (``A``):

- influence of every node on the output: w·(A + A² + …), w the logit nodes' probabilities;
- nodes: keep the most influential until they hold ``node_threshold`` of the total influence (embeddings and
  logits always kept); edges of the kept nodes: keep the most influential, edge influence = A[t, s] ×
  (influence of t + w_t), until they hold ``edge_threshold`` of it; then drop feature and error nodes left with no
  kept edge out, and features left with no kept edge in, until nothing changes;
- replacement score: the embeddings' share of the influence that reaches the output from embeddings and errors
  (1: nothing of the output comes through an error node);
- completeness score: the mean over every node, weighted by its influence on the output plus its own logit
  weight, of the share of its (normalised) input that does not come from error nodes (a node without inputs,
  an embedding or an error, counts as complete).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.analysis.graphs.attribute import EMBEDDING, ERROR, FEATURE, LOGIT, Graph
from saelab.errors import SaelabError


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """weights·(A + A² + …): A is nilpotent (edges go from earlier layers or positions to later ones), so the sum
    ends once a power is zero."""
    term = weights @ A
    total = term.clone()
    for _ in range(max_iter):
        if not bool(term.any()):
            return total
        term = term @ A
        total += term
    raise SaelabError("the influence sum did not end: the graph has a cycle, which an attribution graph cannot have")


def _weights(g: Graph) -> torch.Tensor:
    w = torch.zeros(len(g.nodes))
    w[g.kind_slice(LOGIT)] = g.logit_probs
    return w


def _threshold(scores: torch.Tensor, fraction: float) -> float:
    """The least score among the largest ones that together hold ``fraction`` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = float(s.sum())
    if total <= 0:
        return float("inf")
    at = int(torch.searchsorted((s.cumsum(0) / total).contiguous(), torch.tensor(fraction, dtype=s.dtype)))
    return float(s[min(at, len(s) - 1)])


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [n] bool
    edge_mask: torch.Tensor  # [n, n] bool, as adjacency (rows targets)
    node_influence: torch.Tensor  # [n]


def prune(g: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 <= v <= 1:
            raise SaelabError(f"--{name.replace('_', '-')} must be in [0, 1] (got {v})")
    w = _weights(g)
    node_inf = influence(normalized(g.adjacency), w)
    keep = node_inf >= _threshold(node_inf, node_threshold)
    always = torch.tensor([n["kind"] in (EMBEDDING, LOGIT) for n in g.nodes])
    keep |= always
    A = g.adjacency.clone()
    A[~keep] = 0
    A[:, ~keep] = 0
    An = normalized(A)
    edge_scores = An * (influence(An, w) + w)[:, None]
    edges = (edge_scores >= _threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    inner = torch.tensor([n["kind"] in (FEATURE, ERROR) for n in g.nodes])
    feature = torch.tensor([n["kind"] == FEATURE for n in g.nodes])
    while True:
        edges[~keep] = False
        edges[:, ~keep] = False
        new = keep & ~(inner & ~edges.any(0)) & ~(feature & ~edges.any(1))
        if bool((new == keep).all()):
            break
        keep = new
    return Pruned(keep, edges, node_inf)


def scores(g: Graph) -> dict:
    """{"replacement", "completeness"} of the graph (module docstring)."""
    w = _weights(g)
    An = normalized(g.adjacency)
    inf = influence(An, w)
    err, emb = g.kind_slice(ERROR), g.kind_slice(EMBEDDING)
    from_emb, from_err = float(inf[emb].sum()), float(inf[err].sum())
    replacement = from_emb / (from_emb + from_err) if from_emb + from_err > 0 else 1.0
    non_error = 1 - An[:, err].sum(1)
    out = inf + w
    completeness = float((non_error * out).sum() / out.sum()) if float(out.sum()) > 0 else 1.0
    return {"replacement": replacement, "completeness": completeness}
