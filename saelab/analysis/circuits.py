"""Sparse feature circuits (Marks et al., "Sparse Feature Circuits"): attribution over SAE latents
and SAE error terms at every hooked layer of a group, edges between consecutive hooked layers, and
faithfulness of the circuit under mean ablation — of its nodes and of its edges.

The model, with every SAE of the group spliced in at its hook::

    x  →  f = encode(x),  e = x − decode(f),  x' = decode(f) + e   (= x: the splice changes nothing)

Nodes are every latent ``f_i`` and the error term ``e`` at every hook (the error is one node per
hook). The metric ``m`` is the task's logit difference (``tasks.logit_diff``), averaged over the
task's examples. Every effect is summed over positions and averaged over examples.

* **Node effects.** Attribution patching (``method="attrib"``): ``IE(a) ≈ ∇ₐm · (a_clean − a_patch)``,
  the gradient taken on the clean prompts, ``a_patch`` the node's value on the corrupted prompts.
  For a latent, ∇_f m = ∇ₓm · W_decᵀ. Integrated gradients (``method="ig"``): for each hook
  separately, its nodes are moved together along the straight line from patch to clean in
  ``ig_steps`` steps (midpoint rule, the other hooks computed from there as usual), and the mean
  gradient times the difference is the effect; the effects at a hook then sum to the exact
  change of m as the steps grow (tested).
* **Edges** (u at hook j → d at hook j+1, both in the circuit): ``Σ ∇_d m · ∂d/∂u · (u_clean − u_patch)``
  — one vector-Jacobian product per downstream node, through the model from hook j to hook j+1 and
  the downstream SAE's encoder (for an error node: ``x − decode(encode(x))``).
* **Circuit**: nodes with ``|effect| > node_threshold``; edges among them with ``|weight| ≥ edge_threshold``
  (so threshold 0 keeps every edge, zero-weight ones included).
* **Faithfulness** ``(m(C) − m(∅)) / (m(M) − m(∅))``: M is the model, ∅ mean-ablates every node at
  every hook, C keeps the circuit's nodes and mean-ablates the rest. Hooks are processed in order
  and each SAE encodes the (already ablated) activation that reaches it. The means are per
  position over the task's clean prompts (the task's prompts are position-aligned), so a position
  whose content never changes (BOS) is never changed by ablation.
* **Edge faithfulness**: the node circuit, but each circuit node at hook j+1 is computed from an
  activation at hook j in which only its kept parents have their circuit values — every other
  node at hook j (pruned parents and non-circuit nodes) is at its mean — so a pruned edge carries
  its mean-ablated contribution. Nodes at the first hook are computed from the prompt. With every
  edge among circuit nodes kept it equals the node faithfulness (tested).

Works for any hooks; the path "from hook j to hook j+1" is the model's forward with the hooks up
to j fixed, which for residual-stream hooks (the demo group) is exactly the next block(s).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
from tqdm.auto import tqdm

from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.hooks import flat_hook, forward
from saelab.analysis.tasks import Task, as_task, logit_diff

FORMAT_VERSION = 1
KIND = "sparse_feature_circuit"
NODE_SWEEP = (2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
EDGE_SWEEP = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0)


# ----------------------------------------------------------------------------- the SAE group
@dataclasses.dataclass
class SAEGroup:
    """The SAEs of a group, in hook order (shallowest first)."""

    model: str
    path: pathlib.Path
    hooks: list[str]
    saes: dict            # hook → SAE
    folders: dict         # hook → SAE folder

    @property
    def n_latents(self) -> int:
        return sum(s.d_sae for s in self.saes.values())


def load_group(path, device="cpu") -> SAEGroup:
    """A group folder (``group.json``) or one SAE folder. Every SAE must come from one model."""
    from saelab.hooks import hook_layer
    from saelab.sae import SAE
    from saelab.layout import CFG_FILE, check_local_sae, read_group

    check_local_sae(path)
    path = pathlib.Path(path).expanduser().resolve()
    group = read_group(path)
    if group is not None:
        model, folders = group
    elif (path / CFG_FILE).is_file():
        folders, model = None, None
    else:
        raise SaelabError(f"{path} is neither an SAE group (group.json) nor an SAE folder (cfg.json): "
                          "pass --saes runs/GROUP")
    if folders is None:
        sae = SAE.load(path, device)
        folders = {sae.cfg.hook_name: path}
        saes = {sae.cfg.hook_name: sae}
    else:
        saes = {h: SAE.load(f, device) for h, f in folders.items()}
    models = {}
    for h, sae in saes.items():
        if sae.cfg.hook_name and sae.cfg.hook_name != h:
            raise SaelabError(f"{folders[h]} reads hook {sae.cfg.hook_name!r} but the group lists it under {h!r}: "
                              "fix group.json")
        models[h] = sae.cfg.model_name or model
    names = {m for m in models.values() if m}
    if model:
        names.add(model)
    if len(names) > 1:
        detail = ", ".join(f"{h}: {m}" for h, m in models.items())
        raise SaelabError(f"the SAEs come from different models ({detail}"
                          f"{'; group.json: ' + model if model else ''}): a circuit needs SAEs of one model")
    if not names:
        raise SaelabError(f"{path}: no model name in group.json or the SAEs' cfg.json: cannot tell which model to load")
    hooks = sorted(saes, key=lambda h: (hook_layer(h) if hook_layer(h) is not None else -1,
                                        "resid_pre" not in h, "resid_post" in h, h))
    for s in saes.values():
        s.eval().requires_grad_(False)
    return SAEGroup(names.pop(), path, hooks, saes, {h: pathlib.Path(folders[h]).resolve() for h in hooks})


def _check_model(model, group: SAEGroup):
    from saelab.models import same_model

    name = getattr(model, "saelab_name", None)
    if name and not same_model(name, group.model):
        raise SaelabError(f"the SAEs were trained on model {group.model!r}, not {name!r}: load that model")
    for h, s in group.saes.items():
        if h not in model.hook_dict:
            raise SaelabError(f"the model has no hook {h!r} (SAE {group.folders[h]}): pass the model it was trained on")


# ----------------------------------------------------------------------------- SAE helpers on [n, T, d]
def _encode(sae, x):
    shape = x.shape
    return sae.encode(x.reshape(-1, shape[-1])).reshape(*shape[:-1], sae.d_sae)


def _decode(sae, f):
    return f @ sae.W_dec + sae.b_dec


def _split(sae, x):
    f = _encode(sae, x)
    return f, x - _decode(sae, f)


def _run(model, tokens, hooks: dict, stop_at: str | None = None, capture=()):
    """Run with ``hooks`` {name: fn(x) -> x}; capture the activations named in ``capture`` (after the
    fn); stop right after hook ``stop_at`` (then the logits are None). Every activation is seen as
    [n, T, features] (``saelab.hooks.flat_hook``: as harvest stores it and evaluate and steering splice it)."""
    got = {}

    def make(name, fn):
        def hook_fn(x):
            if fn is not None:
                x = fn(x)
            if name in capture:
                got[name] = x
            return x
        return flat_hook(hook_fn)

    names = set(hooks) | set(capture) | ({stop_at} if stop_at else set())
    logits, _ = forward(model, tokens, [(n, make(n, hooks.get(n))) for n in names],
                        stop_after=(stop_at,) if stop_at else ())
    return logits, got


# ----------------------------------------------------------------------------- activations, gradients
@dataclasses.dataclass
class _Acts:
    f: dict   # hook → [n, T, d_sae]
    e: dict   # hook → [n, T, d]


@torch.no_grad()
def node_values(model, group: SAEGroup, tokens) -> _Acts:
    """Latents and error terms of every SAE of the group on these prompts (the spliced model = the model)."""
    _, got = _run(model, tokens, {}, stop_at=group.hooks[-1], capture=group.hooks)
    f, e = {}, {}
    for h in group.hooks:
        if got[h].ndim != 3 or got[h].shape[-1] != group.saes[h].d_in:
            raise SaelabError(f"hook {h} gives {list(got[h].shape[2:])} per position, not the {group.saes[h].d_in} "
                              f"features SAE {group.folders[h]} reads: circuits need SAEs on hooks with one vector "
                              "per position (or per-head hooks such as attn.hook_z, read with the heads flattened)")
        f[h], e[h] = _split(group.saes[h], got[h].float())
    return _Acts(f, e)


def metric_grads(model, group: SAEGroup, task: Task, tokens=None):
    """(m, {hook: ∇ₓm}) with m = mean logit difference on ``tokens`` (default: the clean prompts)."""
    tokens = task.clean if tokens is None else tokens
    with torch.enable_grad():
        logits, got = _run(model, tokens.to(device_of(model)), {}, capture=group.hooks)
        m = logit_diff(logits, task).mean()
        grads = torch.autograd.grad(m, [got[h] for h in group.hooks])
    return float(m.detach()), {h: g.detach().float() for h, g in zip(group.hooks, grads)}


def attribution_effects(model, group, task, clean: _Acts, patch: _Acts):
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


def ig_effects(model, group, task, clean: _Acts, patch: _Acts, steps: int = 10, progress=False, hooks=None):
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
                x = _decode(sae, f) + e
                logits, _ = _run(model, tokens, {h: lambda act, x=x: x.to(act.dtype)})
                m = logit_diff(logits, task).mean()
                gf, ge = torch.autograd.grad(m, [f, e])
            gf_sum += gf
            ge_sum += ge
            bar.update()
        out[h] = (((gf_sum / steps) * df).sum((0, 1)), float(((ge_sum / steps) * de).sum()))
    bar.close()
    return out


# ----------------------------------------------------------------------------- nodes and edges
def node_id(hook: str, latent: int | None) -> str:
    return f"{hook}/{'error' if latent is None else latent}"


def select_nodes(effects: dict, threshold: float) -> dict:
    """{hook: (latent indices LongTensor, keep_error bool)} with |effect| > threshold."""
    return {h: ((lat.abs() > threshold).nonzero().flatten(), abs(err) > threshold) for h, (lat, err) in effects.items()}


def count_nodes(sel: dict) -> tuple[int, int]:
    """(latent nodes, error nodes)."""
    return sum(len(i) for i, _ in sel.values()), sum(int(k) for _, k in sel.values())


def edge_weights(model, group, task, clean: _Acts, patch: _Acts, sel: dict, progress=False) -> list:
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
            x_up = _decode(su, f) + e
            hooks = dict(fixed)
            hooks[up] = lambda act, x=x_up: x.to(act.dtype)
            _, got = _run(model, tokens, hooks, stop_at=down, capture=(down,))
            x_down = got[down].float()
            f_down, e_down = _split(sd, x_down)
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


def _fixed_upstream(group, hook, acts: _Acts) -> dict:
    """Hooks before ``hook`` pinned to the given values (so only ``hook``'s nodes vary)."""
    out = {}
    for h in group.hooks[: group.hooks.index(hook)]:
        x = _decode(group.saes[h], acts.f[h]) + acts.e[h]
        out[h] = lambda act, x=x: x.to(act.dtype)
    return out


# ----------------------------------------------------------------------------- faithfulness
@dataclasses.dataclass
class Means:
    f: dict  # hook → [T, d_sae]
    e: dict  # hook → [T, d]


def task_means(clean: _Acts) -> Means:
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
            f, e = _split(sae, act.float())
            f = torch.where(keep, f, means.f[h])
            e = e if keep_err else means.e[h].expand_as(e)
            return (_decode(sae, f) + e).to(act.dtype)
        hooks[h] = fn
    logits, _ = _run(model, task.clean.to(dev), hooks)
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
        fixed = {h: (_decode(group.saes[h], vals_f[h]) + vals_e[h]) for h in group.hooks[: group.hooks.index(up)]}
        for a in range(0, len(groups), per):
            chunk = groups[a : a + per]
            xs = []
            for pset, _ in chunk:
                keep = torch.zeros(su.d_sae, dtype=torch.bool, device=dev)
                idx = [u for u in up_lat if node_id(up, u) in pset]
                keep[idx] = True
                f = torch.where(keep, vals_f[up], means.f[up])
                e = vals_e[up] if node_id(up, None) in pset else means.e[up].expand_as(vals_e[up])
                xs.append(_decode(su, f) + e)
            xb = torch.cat(xs)
            reps = len(chunk)
            hooks = {h: (lambda act, x=x.repeat(reps, 1, 1): x.to(act.dtype)) for h, x in fixed.items()}
            hooks[up] = lambda act, x=xb: x.to(act.dtype)
            _, got = _run(model, tokens.repeat(reps, 1), hooks, stop_at=down, capture=(down,))
            f_d, e_d = _split(sd, got[down].float())
            for c, (_, js) in enumerate(chunk):
                sl = slice(c * n, (c + 1) * n)
                for j in js:
                    if j is None:
                        e_new = e_d[sl]
                    else:
                        f_new[..., j] = f_d[sl][..., j]
        vals_f[down], vals_e[down] = f_new, e_new
    hooks = {h: (lambda act, x=_decode(group.saes[h], vals_f[h]) + vals_e[h]: x.to(act.dtype)) for h in group.hooks}
    logits, _ = _run(model, tokens, hooks)
    return float(logit_diff(logits, task).mean())


def faithfulness(m_c: float, m_empty: float, m_full: float) -> float:
    den = m_full - m_empty
    return (m_c - m_empty) / den if abs(den) > 1e-9 else float("nan")


# ----------------------------------------------------------------------------- the whole pipeline
def find_circuit(model, group: SAEGroup, task: Task, method: str = "attrib", ig_steps: int = 10,
                 node_threshold: float = 0.1, edge_threshold: float = 0.01,
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
    _check_model(model, group)
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


def write_circuit(circuit: dict, path) -> pathlib.Path:
    """The circuit as JSON (NaN as null), atomically; its folder made."""
    from saelab.fs import finite_json, write_output

    return write_output(path, json.dumps(finite_json(circuit), indent=1) + "\n")


def circuit(task_spec: str, saes, out=None, *, method="attrib", ig_steps=10, node_threshold=0.1,
            edge_threshold=0.01, n=64, seed=0, model=None, device="auto", progress=True,
            before_write=None) -> tuple[pathlib.Path, dict]:
    """What ``saelab circuit`` does: load the group and its model, build the task, find the circuit,
    write it (default ``<group>/circuits/<task name>.json``; atomically, replacing an existing file).
    ``before_write(path)`` is called just before the file is written (the CLI notes a replaced file)."""
    from saelab.analysis.tasks import make_task
    from saelab.device import pick_device
    from saelab.models import load_model
    from saelab.fs import check_output

    group = load_group(saes)
    if model is None:
        if group.model == "synthetic":
            raise SaelabError(f"{group.path}: these SAEs were trained on a synthetic store, which no model computes: "
                              "pass SAEs trained on a model's activations")
        model = load_model(group.model, pick_device(device))
    _check_model(model, group)
    task = make_task(task_spec, model, n=n, seed=seed)
    # an --out that is a folder or cannot be written is found before the work, not when writing
    out = check_output(out or group.path / "circuits" / f"{task.name}.json", "--out", f"{task.name}.json")
    c = find_circuit(model, group, task, method=method, ig_steps=ig_steps, node_threshold=node_threshold,
                     edge_threshold=edge_threshold, progress=progress)
    if before_write is not None:
        before_write(out)
    return write_circuit(c, out), c


# ----------------------------------------------------------------------------- reading
def load_circuit(path) -> dict:
    """Read and validate a circuit file; SaelabError naming the problem."""
    path = pathlib.Path(path).expanduser()
    try:
        c = json.loads(path.read_text())
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
    ids = set()
    for i, nd in enumerate(c["nodes"]):
        if not isinstance(nd, dict) or not {"id", "hook", "layer", "kind", "latent", "effect"} <= set(nd):
            raise bad(f"node {i} lacks id/hook/layer/kind/latent/effect")
        if nd["hook"] not in c["hooks"] or nd["kind"] not in ("latent", "error"):
            raise bad(f"node {nd['id']!r} has hook {nd['hook']!r} / kind {nd['kind']!r}")
        if (nd["kind"] == "latent") != isinstance(nd["latent"], int):
            raise bad(f"node {nd['id']!r}: latent nodes need an integer latent, error nodes null")
        ids.add(nd["id"])
    for i, ed in enumerate(c["edges"]):
        if not isinstance(ed, dict) or not {"src", "dst", "weight"} <= set(ed):
            raise bad(f"edge {i} lacks src/dst/weight")
        if ed["src"] not in ids or ed["dst"] not in ids:
            raise bad(f"edge {ed['src']!r} → {ed['dst']!r} names a node that is not in the circuit")
    return c
