"""The transcoders a graph runs over (a group of per-layer MLP transcoders, or one), and interventions on them.

A graph's transcoders replace MLPs: each reads ``blocks.L.ln2.hook_normalized`` and writes ``blocks.L.hook_mlp_out``
(what ``saelab harvest --pairs mlp`` pairs), at most one per layer. A layer without one keeps its MLP's output as
error nodes.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch

from saelab.errors import SaelabError
from saelab.hooks import mlp_hooks, mlp_layer, relay
from saelab.layout import group_or_folder


@dataclass
class Transcoders:
    path: pathlib.Path
    model: str
    coders: dict  # {layer: transcoder}
    folders: dict  # {layer: its folder}


def load_transcoders(path, device="cpu") -> Transcoders:
    """The MLP transcoders of a group folder or of one transcoder folder; a one-line error for anything else."""
    from saelab.sae import SAE

    path, model, group = group_or_folder(path, "pass --sae runs/GROUP of transcoders")
    folders = list(group.values()) if group is not None else [path]
    coders, where, models = {}, {}, set()
    for folder in folders:
        t = SAE.load(folder, device).eval().one_layer("saelab attribute")
        c = t.cfg
        if not c.hook_name_out:
            raise SaelabError(f"{folder} is a {c.arch} SAE (it reads and writes {c.hook_name}): attribution graphs run "
                              "over transcoders; train them with saelab train --arch transcoder on a RUN harvested "
                              "with --pairs mlp")
        L = mlp_layer(c.hook_name, c.hook_name_out)
        if L is None:
            raise SaelabError(f"{folder} reads {c.hook_name} and writes {c.hook_name_out}: an attribution graph "
                              "replaces MLPs, so it needs transcoders from blocks.L.ln2.hook_normalized to "
                              "blocks.L.hook_mlp_out (harvest --pairs mlp)")
        if L in coders:
            raise SaelabError(f"{where[L]} and {folder} both replace the MLP of layer {L}: pass a group with one "
                              "transcoder per layer")
        coders[L], where[L] = t, folder
        if c.model_name:
            models.add(c.model_name)
    if model:
        models.add(model)
    if len(models) > 1:
        raise SaelabError(f"the transcoders come from different models ({', '.join(sorted(models))}): a graph needs "
                          "transcoders of one model")
    if not models or models == {"synthetic"}:
        raise SaelabError(f"{path}: these transcoders name no model they were trained on (a synthetic store): pass "
                          "transcoders trained on a model's activations")
    return Transcoders(path, models.pop(), coders, where)


def check_model(model, tc: Transcoders) -> None:
    """A one-line error unless the model has every layer and hook the transcoders replace."""
    for L, folder in tc.folders.items():
        for h in mlp_hooks(L):
            if h not in model.hook_dict:
                raise SaelabError(f"the model has no hook {h!r} (transcoder {folder}): pass the model it was trained on")


@torch.no_grad()
def intervene(model, coders: dict, tokens: torch.Tensor, interventions) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, intervened) next-token logits after ``tokens`` [T] through the real model, where each intervention
    (layer, position, feature, value) sets that feature's activation to ``value`` at that position: its MLP's
    output gets (value − a)·W_dec[feature], a the feature's activation in this forward (read from the live MLP
    input, so an earlier intervention's effect on it counts)."""
    by_layer: dict[int, list] = {}
    T = tokens.numel()
    for L, p, f, v in interventions:
        if L not in coders:
            raise SaelabError(f"no transcoder replaces the MLP of layer {L}: intervene on layers "
                              f"{', '.join(map(str, sorted(coders)))}")
        if not 0 <= p < T or not 0 <= f < coders[L].d_sae:
            raise SaelabError(f"intervention ({L}, {p}, {f}) is out of range: positions 0..{T - 1}, features "
                              f"0..{coders[L].d_sae - 1}")
        by_layer.setdefault(L, []).append((p, f, float(v)))
    toks = tokens.reshape(1, -1)
    clean = model(toks)[0, -1].float()
    hooks = []
    for L, items in by_layer.items():
        def write(x, flat, coder=coders[L], items=items):  # x: the MLP's live input, flat: its output
            codes = coder.encode(x[0].float())
            out = flat.clone()
            for p, f, v in items:
                out[0, p] += ((v - codes[p, f]) * coder.W_dec[f]).to(flat.dtype)
            return out

        hooks += relay(*mlp_hooks(L), write)
    new = model.run_with_hooks(toks, fwd_hooks=hooks)[0, -1].float()
    return clean, new
