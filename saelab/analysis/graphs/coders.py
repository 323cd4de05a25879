"""The transcoders a graph runs over (a group of per-layer MLP transcoders, one of them, or a cross-layer
transcoder), and interventions on them.

A graph's transcoders replace MLPs: each reads ``blocks.L.ln2.hook_normalized`` and writes ``blocks.L.hook_mlp_out``
(what ``saelab harvest --pairs mlp`` pairs), at most one per layer; a cross-layer transcoder is seen as one
``CLTLayer`` per layer, which also writes every later MLP output. A layer without one keeps its MLP's output as
error nodes.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch

from saelab.analysis.graphs.replacement import decoders
from saelab.config import CLT
from saelab.errors import SaelabError
from saelab.hooks import flat_hook, mlp_hooks, mlp_layer
from saelab.layout import group_or_folder


class CLTLayer:
    """Layer ``index`` of a cross-layer transcoder as that MLP's transcoder (raw units, the CLT's scales folded in):
    it encodes that MLP's input with the CLT's activation of that layer and writes to its output and every later one (``decoders``); its
    ``b_dec`` is the CLT's output bias of that layer. Detached: a graph does not train. Only this layer's slices of
    the CLT's weights are held, views of them where the scales are 1 (a saved CLT's are folded), so the layers
    together hold no more than the CLT does."""

    skip = False

    def __init__(self, clt, index: int, layers: list[int]):
        self.clt, self.index = clt, index
        self.k = clt.cfg.k  # TopK's active latents per layer; relu/jumprelu's target L0 per layer
        self.d_sae = clt.d_sae
        with torch.no_grad():
            s_in, s_out = clt.in_scale[index], clt.out_scale[index:]
            self.W_enc = clt.W_enc[index].detach() if bool(s_in == 1) else (clt.W_enc[index] * s_in).detach()
            self.b_enc = clt.b_enc[index].detach()
            W = clt.W_dec[index, :, index:].detach()  # [d_sae, later layers, d_out]: the mask is 1 on l <= m
            if not bool((s_out == 1).all()):
                W = W / s_out[None, :, None]
            self.decoders = {layers[m]: W[:, m - index] for m in range(index, len(layers))}
            self.W_dec = self.decoders[layers[index]]
            self.b_dec = (clt.b_dec[index] / clt.out_scale[index]).detach()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return self.clt.layer_activation(z, self.index)  # in z's units, which folding the scales leaves as they are

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_acts(x))


def clt_layers(clt, folder) -> dict[int, CLTLayer]:
    """{MLP layer: its CLTLayer} of a cross-layer transcoder whose pairs are MLPs' inputs and outputs."""
    layers = []
    for pair in clt.cfg.clt_pairs:
        read, _, write = pair.partition(":")
        L = mlp_layer(read, write)
        if L is None:
            raise SaelabError(f"{folder} pairs {read} with {write}: an attribution graph replaces MLPs, so it needs a "
                              "cross-layer transcoder over MLP pairs (harvest --pairs mlp)")
        layers.append(L)
    return {L: CLTLayer(clt, i, layers) for i, L in enumerate(layers)}


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
        t = SAE.load(folder, device).eval()
        c = t.cfg
        if c.arch == CLT:
            if len(folders) > 1:
                raise SaelabError(f"{path} holds a cross-layer transcoder ({folder}) beside other SAEs: pass the CLT's "
                                  "own folder, or a group of per-layer transcoders")
            coders = clt_layers(t, folder)
            where = dict.fromkeys(coders, folder)
            if c.model_name:
                models.add(c.model_name)
            break
        t = t.one_layer("saelab attribute")
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
    (layer, position, feature, value) sets that feature's activation to ``value`` at that position: each MLP
    output it writes (its own; a cross-layer transcoder's later ones too) gets (value − a)·W_dec, a the feature's
    activation in this forward (read from the live MLP input, so an earlier intervention's effect on it counts)."""
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
    pending: dict[int, list] = {}  # {MLP layer m: [(position, vector to add to m's output)]}

    def read(L, items):
        def fn(x):  # the MLP's live input: the features' activations in this forward
            codes = coders[L].encode(x[0].float())
            for m, W in decoders(coders[L], L).items():
                pending.setdefault(m, []).extend((p, (v - codes[p, f]) * W[f]) for p, f, v in items)
        return flat_hook(fn)

    def write(m):
        def fn(flat):
            out = flat.clone()
            for p, vec in pending.pop(m, []):
                out[0, p] += vec.to(flat.dtype)
            return out
        return flat_hook(fn)

    hooks = [(mlp_hooks(L)[0], read(L, items)) for L, items in by_layer.items()]
    hooks += [(mlp_hooks(m)[1], write(m)) for m in sorted({m for L in by_layer for m in decoders(coders[L], L)})]
    new = model.run_with_hooks(toks, fwd_hooks=hooks)[0, -1].float()
    return clean, new
