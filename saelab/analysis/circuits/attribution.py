"""Node effects and edge weights of a circuit: attribution patching, integrated gradients, and the
vector-Jacobian products between the nodes of consecutive hooks."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from saelab.analysis.circuits.group import SAEGroup
from saelab.analysis.circuits.nodes import Acts, decode, hooked_run, node_id, split
from saelab.analysis.tasks import Task, logit_diff
from saelab.device import device_of
from saelab.errors import SaelabError


def metric_grads(model, group: SAEGroup, task: Task, tokens=None):
    """(m, {hook: ∇ₓm}) with m = mean logit difference on ``tokens`` (default: the clean prompts)."""
    tokens = task.clean if tokens is None else tokens
    with torch.enable_grad():
        logits, got = hooked_run(model, tokens.to(device_of(model)), {}, capture=group.hooks)
        m = logit_diff(logits, task).mean()
        grads = torch.autograd.grad(m, [got[h] for h in group.hooks])
    return float(m.detach()), {h: g.detach().float() for h, g in zip(group.hooks, grads)}


def attribution_effects(model, group, task, clean: Acts, patch: Acts):
    """Attribution patching: {hook: (latent effects [d_sae], error effect float)}."""
    _, gx = metric_grads(model, group, task)
    out = {}
    for h in group.hooks:
        sae = group.saes[h]
        g_f = gx[h] @ sae.W_dec.T
        lat = (g_f * (clean.f[h] - patch.f[h])).sum((0, 1))
        err = float((gx[h] * (clean.e[h] - patch.e[h])).sum())
        out[h] = (lat, err)
    return out


def ig_effects(model, group, task, clean: Acts, patch: Acts, steps: int = 10, progress=False, hooks=None):
    """Integrated gradients per hook (midpoint rule over ``steps`` points from patch to clean);
    ``hooks``: only these (default: all)."""
    if steps < 1:
        raise SaelabError(f"--ig-steps must be at least 1 (got {steps})")
    dev = device_of(model)
    tokens = task.clean.to(dev)
    out = {}
    hooks = list(hooks or group.hooks)
    bar = tqdm(total=steps * len(hooks), desc="integrated gradients", disable=not progress, unit="step")
    for h in hooks:
        sae = group.saes[h]
        df, de = clean.f[h] - patch.f[h], clean.e[h] - patch.e[h]
        gf_sum, ge_sum = torch.zeros_like(df), torch.zeros_like(de)
        for k in range(steps):
            a = (k + 0.5) / steps
            with torch.enable_grad():
                f = (patch.f[h] + a * df).requires_grad_(True)
                e = (patch.e[h] + a * de).requires_grad_(True)
                x = decode(sae, f) + e
                logits, _ = hooked_run(model, tokens, {h: lambda act, x=x: x.to(act.dtype)})
                m = logit_diff(logits, task).mean()
                gf, ge = torch.autograd.grad(m, [f, e])
            gf_sum += gf
            ge_sum += ge
            bar.update()
        out[h] = (((gf_sum / steps) * df).sum((0, 1)), float(((ge_sum / steps) * de).sum()))
    bar.close()
    return out


def edge_weights(model, group, task, clean: Acts, patch: Acts, sel: dict, progress=False) -> list:
    """[(src id, dst id, weight)] for every pair of circuit nodes at consecutive hooks."""
    dev = device_of(model)
    tokens = task.clean.to(dev)
    _, gx = metric_grads(model, group, task)
    edges = []
    pairs = list(zip(group.hooks[:-1], group.hooks[1:]))
    total = sum(len(sel[d][0]) + int(sel[d][1]) for _, d in pairs)
    bar = tqdm(total=total, desc="edges", disable=not progress, unit="node")
    for up, down in pairs:
        su, sd = group.saes[up], group.saes[down]
        up_lat, up_err = sel[up]
        down_lat, down_err = sel[down]
        if (len(up_lat) == 0 and not up_err) or (len(down_lat) == 0 and not down_err):
            bar.update(len(down_lat) + int(down_err))
            continue
        fixed = _fixed_upstream(group, up, clean)
        with torch.enable_grad():
            f = clean.f[up].clone().requires_grad_(True)
            e = clean.e[up].clone().requires_grad_(True)
            x_up = decode(su, f) + e
            hooks = dict(fixed)
            hooks[up] = lambda act, x=x_up: x.to(act.dtype)
            _, got = hooked_run(model, tokens, hooks, stop_at=down, capture=(down,))
            x_down = got[down].float()
            f_down, e_down = split(sd, x_down)
            g_f = gx[down] @ sd.W_dec.T
            df_up, de_up = clean.f[up] - patch.f[up], clean.e[up] - patch.e[up]
            targets = [(int(i), (g_f[..., i] * f_down[..., i]).sum()) for i in down_lat.tolist()]
            if down_err:
                targets.append((None, (gx[down] * e_down).sum()))
            for j, s in targets:
                gf, ge = torch.autograd.grad(s, [f, e], retain_graph=True, allow_unused=True)
                dst = node_id(down, j)
                if gf is not None and len(up_lat):
                    w = (gf[..., up_lat] * df_up[..., up_lat]).sum((0, 1))
                    edges += [(node_id(up, int(u)), dst, float(v)) for u, v in zip(up_lat.tolist(), w.tolist())]
                if up_err and ge is not None:
                    edges.append((node_id(up, None), dst, float((ge * de_up).sum())))
                bar.update()
    bar.close()
    return edges


def _fixed_upstream(group, hook, acts: Acts) -> dict:
    """Hooks before ``hook`` pinned to the given values (so only ``hook``'s nodes vary)."""
    out = {}
    for h in group.hooks[: group.hooks.index(hook)]:
        x = decode(group.saes[h], acts.f[h]) + acts.e[h]
        out[h] = lambda act, x=x: x.to(act.dtype)
    return out
