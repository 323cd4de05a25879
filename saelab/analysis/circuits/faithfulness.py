"""Faithfulness of a circuit under mean ablation: the metric with the nodes outside it (or, for edges, the
pruned parents) at their per-position means over the task's clean prompts."""

from __future__ import annotations

import dataclasses

import torch

from saelab.analysis.circuits.nodes import Acts, decode, hooked_run, node_id, node_values, split
from saelab.analysis.tasks import logit_diff
from saelab.device import device_of


@dataclasses.dataclass
class Means:
    """Every node's per-position mean over the task's clean prompts: what ablation puts in its place."""

    f: dict  # hook → [T, d_sae]
    e: dict  # hook → [T, d]


def task_means(clean: Acts) -> Means:
    """Per-position means over the task's clean prompts."""
    return Means({h: v.mean(0) for h, v in clean.f.items()}, {h: v.mean(0) for h, v in clean.e.items()})


def _mask(sel_h, d_sae, device):
    m = torch.zeros(d_sae, dtype=torch.bool, device=device)
    m[sel_h[0]] = True
    return m


@torch.no_grad()
def ablated_metric(model, group, task, means: Means, sel: dict | None) -> float:
    """m with every node outside ``sel`` mean-ablated at every hook (``sel=None``: nothing kept, ∅)."""
    dev = device_of(model)
    hooks = {}
    for h in group.hooks:
        sae = group.saes[h]
        keep = _mask(sel[h], sae.d_sae, dev) if sel else torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
        keep_err = bool(sel and sel[h][1])

        def fn(act, sae=sae, keep=keep, keep_err=keep_err, h=h):
            f, e = split(sae, act.float())
            f = torch.where(keep, f, means.f[h])
            e = e if keep_err else means.e[h].expand_as(e)
            return (decode(sae, f) + e).to(act.dtype)
        hooks[h] = fn
    logits, _ = hooked_run(model, task.clean.to(dev), hooks)
    return float(logit_diff(logits, task).mean())


@torch.no_grad()
def edge_ablated_metric(model, group, task, means: Means, sel: dict, edges: list, threshold: float,
                        batch: int = 1024) -> float:
    """m when circuit nodes are computed only from their kept parents (|weight| ≥ threshold);
    pruned parents and non-circuit nodes enter at their means."""
    dev = device_of(model)
    tokens = task.clean.to(dev)
    n = len(task)
    parents: dict[str, set] = {}
    for s, d, w in edges:
        if abs(w) >= threshold:
            parents.setdefault(d, set()).add(s)
    first = group.hooks[0]
    sae0 = group.saes[first]
    clean0 = node_values(model, group, task.clean.to(dev))  # the first hook's nodes come from the prompt
    keep0 = _mask(sel[first], sae0.d_sae, dev)
    vals_f = {first: torch.where(keep0, clean0.f[first], means.f[first])}
    vals_e = {first: clean0.e[first] if sel[first][1] else means.e[first].expand_as(clean0.e[first])}
    for up, down in zip(group.hooks[:-1], group.hooks[1:]):
        su, sd = group.saes[up], group.saes[down]
        up_lat = sel[up][0].tolist()
        f_new = means.f[down].expand(n, *means.f[down].shape).clone()
        e_new = means.e[down].expand(n, *means.e[down].shape).clone()
        targets = [(int(i), node_id(down, int(i))) for i in sel[down][0].tolist()]
        if sel[down][1]:
            targets.append((None, node_id(down, None)))
        # one forward per distinct parent set, batched
        by_parents: dict[frozenset, list] = {}
        for j, nid in targets:
            by_parents.setdefault(frozenset(parents.get(nid, ())), []).append(j)
        groups = list(by_parents.items())
        per = max(1, batch // n)
        fixed = {h: (decode(group.saes[h], vals_f[h]) + vals_e[h]) for h in group.hooks[: group.hooks.index(up)]}
        for a in range(0, len(groups), per):
            chunk = groups[a : a + per]
            xs = []
            for pset, _ in chunk:
                keep = torch.zeros(su.d_sae, dtype=torch.bool, device=dev)
                idx = [u for u in up_lat if node_id(up, u) in pset]
                keep[idx] = True
                f = torch.where(keep, vals_f[up], means.f[up])
                e = vals_e[up] if node_id(up, None) in pset else means.e[up].expand_as(vals_e[up])
                xs.append(decode(su, f) + e)
            xb = torch.cat(xs)
            reps = len(chunk)
            hooks = {h: (lambda act, x=x.repeat(reps, 1, 1): x.to(act.dtype)) for h, x in fixed.items()}
            hooks[up] = lambda act, x=xb: x.to(act.dtype)
            _, got = hooked_run(model, tokens.repeat(reps, 1), hooks, stop_at=down, capture=(down,))
            f_d, e_d = split(sd, got[down].float())
            for c, (_, js) in enumerate(chunk):
                sl = slice(c * n, (c + 1) * n)
                for j in js:
                    if j is None:
                        e_new = e_d[sl]
                    else:
                        f_new[..., j] = f_d[sl][..., j]
        vals_f[down], vals_e[down] = f_new, e_new
    hooks = {h: (lambda act, x=decode(group.saes[h], vals_f[h]) + vals_e[h]: x.to(act.dtype)) for h in group.hooks}
    logits, _ = hooked_run(model, tokens, hooks)
    return float(logit_diff(logits, task).mean())


def faithfulness(m_c: float, m_empty: float, m_full: float) -> float:
    """``(m(C) − m(∅)) / (m(M) − m(∅))``; NaN where the model and the all-ablated model score alike."""
    den = m_full - m_empty
    return (m_c - m_empty) / den if abs(den) > 1e-9 else float("nan")
