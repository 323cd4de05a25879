"""Attribution graphs: the direct effects between a prompt's nodes in its local replacement model.

Nodes, in this order: the active features (layer, then position, then latent), one error node per MLP and
position, one embedding node per position, and the logit nodes (the most likely next tokens after the last
position, until their probabilities sum to ``logit_prob`` or there are ``max_logits``). ``adjacency[t, s]`` is the
direct effect of source s on target t (rows: features and logits; columns: features, errors and embeddings), so
for every target t: value[t] = Σ_s adjacency[t, s] + bias[t] (exactly, up to float error: the replacement is
affine in its sources). A feature's value is its pre-activation; a logit's is the logit minus the mean logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saelab.analysis.graphs.replacement import Replacement

FEATURE, ERROR, EMBEDDING, LOGIT = "feature", "error", "embedding", "logit"


@dataclass
class Graph:
    """A prompt's attribution graph, unpruned (``saelab.analysis.graphs.prune`` selects from it)."""

    prompt: str
    tokens: list[str]  # the prompt's tokens as strings, BOS first
    token_ids: list[int]
    n_layers: int
    nodes: list[dict]  # {id, kind, layer, position, feature, activation, token?, prob?}, in the module's order
    adjacency: torch.Tensor  # [n, n]: rows targets, columns sources
    value: torch.Tensor  # [n]: each target's value in the real forward (NaN for a source only)
    bias: torch.Tensor  # [n]: each target's value with every source zero (NaN for a source only)
    logit_probs: torch.Tensor  # [n_logits]: the logit nodes' probabilities
    linearization_error: float = 0.0  # max |replacement's value − real value| over the targets

    def kind_slice(self, kind: str) -> slice:
        idx = [i for i, n in enumerate(self.nodes) if n["kind"] == kind]
        return slice(idx[0], idx[-1] + 1) if idx else slice(0, 0)


def select_logits(logits: torch.Tensor, max_logits: int, logit_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, probabilities) of the most likely next tokens, fewest whose probabilities reach ``logit_prob``,
    at most ``max_logits``."""
    p = logits.softmax(-1)
    top_p, top_i = p.topk(min(max_logits, p.numel()))
    n = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(logit_prob, dtype=top_p.dtype))) + 1
    return top_i[:n], top_p[:n]


def _target_values(rep: Replacement, logits: torch.Tensor, live: dict, spec: dict) -> torch.Tensor:
    """The targets' values in one run of B copies, copy b holding target b: ``spec`` gives each target's kind
    (0 feature, 1 logit), layer, position, latent and token id, as [B] tensors."""
    B = logits.shape[0]
    vals = logits.new_zeros(B)
    kind, layer, pos, feat, tok = spec["kind"], spec["layer"], spec["pos"], spec["feat"], spec["tok"]
    for L, x in live.items():
        b = ((kind == 0) & (layer == L)).nonzero().squeeze(1)
        if len(b):
            coder = rep.coders[L]
            vals[b] = (x[b, pos[b]] * coder.W_enc[:, feat[b]].T).sum(-1) + coder.b_enc[feat[b]]
    b = (kind == 1).nonzero().squeeze(1)
    if len(b):
        last = logits[b, -1]
        vals[b] = last.gather(1, tok[b, None]).squeeze(1) - last.mean(-1)
    return vals


def build_graph(model, coders: dict[int, object], prompt: str, tokens: torch.Tensor, *, max_logits: int = 10,
                logit_prob: float = 0.95, batch_size: int = 64, max_features: int | None = None,
                progress: bool = False) -> Graph:
    """The unpruned attribution graph of ``tokens`` [T] (``prompt`` is its text) over ``coders`` {layer:
    transcoder}. ``max_features``: keep the features of the largest activations (the others join their error
    nodes, so every target's sum stays exact); None keeps every active feature."""
    rep = Replacement(model, coders, tokens)
    if max_features is not None:
        _cap_features(rep, max_features)
    T = rep.tokens.shape[1]
    logit_ids, logit_p = select_logits(rep.logits, max_logits, logit_prob)
    strs = [str(s) for s in model.to_str_tokens(rep.tokens[0])]

    nodes: list[dict] = []
    for n in rep.layers:
        for p, f, a in zip(n.positions.tolist(), n.features.tolist(), n.activations.tolist()):
            nodes.append({"id": f"{n.layer}.{f}@{p}", "kind": FEATURE, "layer": n.layer, "position": p, "feature": f,
                          "activation": a})
    n_feat = len(nodes)
    for n in rep.layers:
        for p in range(T):
            nodes.append({"id": f"err{n.layer}@{p}", "kind": ERROR, "layer": n.layer, "position": p, "feature": None,
                          "activation": float(n.error[p].norm())})
    for p in range(T):
        nodes.append({"id": f"emb@{p}", "kind": EMBEDDING, "layer": -1, "position": p, "feature": None,
                      "activation": float(rep.embed[p].norm()), "token": strs[p]})
    for v, pr in zip(logit_ids.tolist(), logit_p.tolist()):
        nodes.append({"id": f"logit.{v}", "kind": LOGIT, "layer": rep.n_layers, "position": T - 1, "feature": v,
                      "activation": None, "token": str(model.tokenizer.decode([v])), "prob": pr})
    n = len(nodes)
    err0, emb0, logit0 = n_feat, n_feat + rep.n_layers * T, n_feat + rep.n_layers * T + T

    # the targets: every feature, then every logit node
    targets = list(range(n_feat)) + list(range(logit0, n))
    dev = rep.logits.device

    def spec_of(ids: list[int]) -> dict:
        kind = torch.tensor([0 if nodes[i]["kind"] == FEATURE else 1 for i in ids], device=dev)
        layer = torch.tensor([nodes[i]["layer"] for i in ids], device=dev)
        pos = torch.tensor([nodes[i]["position"] for i in ids], device=dev)
        feat = torch.tensor([nodes[i]["feature"] if nodes[i]["kind"] == FEATURE else 0 for i in ids], device=dev)
        tok = torch.tensor([nodes[i]["feature"] if nodes[i]["kind"] == LOGIT else 0 for i in ids], device=dev)
        return {"kind": kind, "layer": layer, "pos": pos, "feat": feat, "tok": tok}

    adjacency = torch.zeros(n, n, device=dev)
    value = torch.full((n,), float("nan"), device=dev)
    bias = torch.full((n,), float("nan"), device=dev)
    tok_vec, pos_vec = (t.float() for t in rep._embed_parts)
    feat_cols = []  # (layer nodes, first column) of the feature sources
    col = 0
    for layer_nodes in rep.layers:
        feat_cols.append((layer_nodes, col))
        col += len(layer_nodes.features)

    for a in tqdm(range(0, len(targets), batch_size), disable=not progress, desc="attribute", unit="batch"):
        ids = targets[a : a + batch_size]
        spec = spec_of(ids)
        logits, live, leaves = rep.run(len(ids), grad=True)
        vals = _target_values(rep, logits, live, spec)
        vals.sum().backward()
        rows = torch.tensor(ids, device=dev)
        value[rows] = vals.detach()
        with torch.no_grad():
            g_tok, g_pos = _grad(leaves["embed_tok"]), _grad(leaves["embed_pos"])
            adjacency[rows, emb0 : emb0 + T] = (g_tok * tok_vec).sum(-1) + (g_pos * pos_vec).sum(-1)
            grads = {n.layer: _grad(leaves[n.layer]) for n in rep.layers}  # [B, T, d]: ∂target / ∂(MLP output)
            for L, g in grads.items():
                adjacency[rows, err0 + L * T : err0 + (L + 1) * T] = (g * rep.layers[L].error).sum(-1)
            for layer_nodes, first in feat_cols:  # a feature's effect: through every output its decoders write
                if len(layer_nodes.features):
                    direct = sum(torch.einsum("bnd,nd->bn", grads[m][:, layer_nodes.positions], W)
                                 for m, W in layer_nodes.writes.items())
                    adjacency[rows, first : first + len(layer_nodes.features)] = direct * layer_nodes.activations
    with torch.no_grad():  # the constant parts: every target's value with every source zero, in one run per target
        for a in range(0, len(targets), batch_size):
            ids = targets[a : a + batch_size]
            logits, live, _ = rep.run(len(ids), sources="zero")
            bias[torch.tensor(ids, device=dev)] = _target_values(rep, logits, live, spec_of(ids))
    real = torch.cat([torch.cat([ln.pre_activations for ln in rep.layers]),
                      (rep.logits[logit_ids] - rep.logits.mean())])
    lin_err = float((value[targets] - real).abs().max()) if targets else 0.0
    return Graph(prompt=prompt, tokens=strs, token_ids=rep.tokens[0].tolist(), n_layers=rep.n_layers, nodes=nodes,
                 adjacency=adjacency.cpu(), value=value.cpu(), bias=bias.cpu(), logit_probs=logit_p.cpu(),
                 linearization_error=lin_err)


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient (zeros where no target of the batch depends on it: a later layer's output)."""
    return torch.zeros_like(leaf, dtype=torch.float32) if leaf.grad is None else leaf.grad.float()


def _cap_features(rep: Replacement, cap: int) -> None:
    """Keep the ``cap`` features of the largest activations over all layers; each other one's decoded vectors join
    the error nodes of its position and the layers it writes to, so the replacement writes what it wrote."""
    acts = torch.cat([n.activations.abs() for n in rep.layers])
    if len(acts) <= cap:
        return
    keep_all = torch.zeros(len(acts), dtype=torch.bool, device=acts.device)
    keep_all[acts.topk(cap).indices] = True
    start = 0
    for n in rep.layers:
        count = len(n.features)
        keep = keep_all[start : start + count]
        start += count
        if count == 0 or keep.all():
            continue
        drop = ~keep
        for m, W in n.writes.items():  # every output the dropped features write
            rep.layers[m].error = rep.layers[m].error.index_add(0, n.positions[drop], n.activations[drop, None] * W[drop])
        n.keep(keep)
