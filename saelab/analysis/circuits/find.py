"""``find_circuit``: a task's sparse feature circuit over an SAE group, as the circuit-file dict."""

from __future__ import annotations

import pathlib

import torch
from tqdm.auto import tqdm

from saelab.analysis.circuits.attribution import attribution_effects, edge_weights, ig_effects
from saelab.analysis.circuits.faithfulness import ablated_metric, edge_ablated_metric, faithfulness, task_means
from saelab.analysis.circuits.file import FORMAT_VERSION, KIND
from saelab.analysis.circuits.group import SAEGroup, check_model, load_group
from saelab.analysis.circuits.nodes import count_nodes, node_id, node_values, select_nodes
from saelab.analysis.tasks import Task, as_task, logit_diff
from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.options import CircuitOptions

NODE_SWEEP = (2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
EDGE_SWEEP = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0)


def find_circuit(model, group: SAEGroup, task: Task, method: str = CircuitOptions.method,
                 ig_steps: int = CircuitOptions.ig_steps, node_threshold: float = CircuitOptions.node_threshold,
                 edge_threshold: float = CircuitOptions.edge_threshold,
                 node_sweep=NODE_SWEEP, edge_sweep=EDGE_SWEEP, progress: bool = True, edges: bool = True) -> dict:
    """Everything ``saelab circuit`` computes, as the circuit-file dict. ``edges=False`` skips the
    edges and their faithfulness (then ``edges`` is empty and the edge faithfulness None).
    ``group`` may be a group folder (loaded with ``load_group``) and ``task`` a built-in task name or a
    .jsonl path (built with ``make_task(task, model)``: 64 examples, seed 0, as ``saelab circuit``)."""
    if isinstance(group, (str, pathlib.Path)):
        group = load_group(group)
    task = as_task(task, model)
    if not isinstance(group, SAEGroup):
        raise SaelabError(f"group must be an SAE group folder or load_group(folder), not {type(group).__name__}")
    if method not in ("attrib", "ig"):
        raise SaelabError(f"--method {method!r}: choose attrib or ig")
    if not (node_threshold >= 0 and edge_threshold >= 0):
        raise SaelabError(f"--node-threshold and --edge-threshold must be at least 0 (got {node_threshold}, "
                          f"{edge_threshold}); 0 keeps every node or edge")
    if len(task) == 0:
        raise SaelabError("the task has no examples: pass a task with at least one prompt")
    check_model(model, group)
    dev = device_of(model)
    for s in group.saes.values():
        s.to(dev)
    clean = node_values(model, group, task.clean.to(dev))
    patch = node_values(model, group, task.corrupted.to(dev))
    if method == "attrib":
        effects = attribution_effects(model, group, task, clean, patch)
    else:
        effects = ig_effects(model, group, task, clean, patch, ig_steps, progress)
    means = task_means(clean)
    with torch.no_grad():
        ld_full = logit_diff(model(task.clean.to(dev)), task)
        m_full, acc = float(ld_full.mean()), float((ld_full > 0).float().mean())
    m_empty = ablated_metric(model, group, task, means, None)

    sweep = []
    for t in tqdm(sorted(set(node_sweep) | {node_threshold}, reverse=True), desc="node sweep", disable=not progress):
        s = select_nodes(effects, t)
        lat, err = count_nodes(s)
        sweep.append({"threshold": t, "n_nodes": lat + err, "n_latents": lat,
                      "faithfulness": faithfulness(ablated_metric(model, group, task, means, s), m_empty, m_full)})
    sel = select_nodes(effects, node_threshold)
    m_circuit = ablated_metric(model, group, task, means, sel)
    all_edges = edge_weights(model, group, task, clean, patch, sel, progress) if edges else []
    edge_sweep_out = []
    for t in tqdm(sorted(set(edge_sweep) | {edge_threshold}, reverse=True) if edges else [], desc="edge sweep",
                  disable=not progress):
        m_e = edge_ablated_metric(model, group, task, means, sel, all_edges, t)
        edge_sweep_out.append({"threshold": t, "n_edges": sum(abs(w) >= t for *_, w in all_edges),
                               "faithfulness": faithfulness(m_e, m_empty, m_full)})
    m_edges = next((r["faithfulness"] for r in edge_sweep_out if r["threshold"] == edge_threshold), None)

    nodes = []
    for layer, h in enumerate(group.hooks):
        lat, err = effects[h]
        for i in sel[h][0].tolist():
            nodes.append({"id": node_id(h, i), "hook": h, "layer": layer, "kind": "latent", "latent": i,
                          "effect": float(lat[i])})
        if sel[h][1]:
            nodes.append({"id": node_id(h, None), "hook": h, "layer": layer, "kind": "error", "latent": None,
                          "effect": float(err)})
    kept = [{"src": s, "dst": d, "weight": w} for s, d, w in all_edges if abs(w) >= edge_threshold]
    n_lat = sum(1 for x in nodes if x["kind"] == "latent")
    out = {
        "format_version": FORMAT_VERSION, "kind": KIND, "model": group.model, "group": str(group.path),
        "saes": {h: str(group.folders[h]) for h in group.hooks}, "hooks": list(group.hooks),
        "task": {"name": task.name, "n_examples": len(task), "metric": "logit_diff", "accuracy": acc},
        "method": method, **({"ig_steps": ig_steps} if method == "ig" else {}),
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
        "nodes": nodes, "edges": kept,
        "faithfulness": {"nodes": faithfulness(m_circuit, m_empty, m_full), "edges": m_edges,
                         "node_sweep": sweep, "edge_sweep": edge_sweep_out},
        "metric_values": {"full": m_full, "empty": m_empty, "circuit": m_circuit},
        "n_latents_total": group.n_latents, "latent_fraction": n_lat / group.n_latents,
        "error_effects": {h: float(effects[h][1]) for h in group.hooks},
    }
    return out
