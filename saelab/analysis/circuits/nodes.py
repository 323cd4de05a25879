"""A circuit's nodes: every SAE latent and the SAE error term at every hook of the group.

With every SAE spliced in at its hook, ``x → f = encode(x), e = x − decode(f), x' = decode(f) + e`` (= x:
the splice changes nothing). ``split`` gives (f, e), ``hooked_run`` the forward with activations replaced
(seen as [n, T, features]), ``node_values`` every hook's (f, e) on some prompts, ``node_id`` a node's name
in the circuit file and ``select_nodes`` the nodes whose effect passes a threshold.
"""

from __future__ import annotations

import dataclasses

import torch

from saelab.analysis.circuits.group import SAEGroup
from saelab.errors import SaelabError
from saelab.hooks import flat_hook, forward


def _encode(sae, x):
    """The SAE's latents of x [..., d_in]: [..., d_sae]."""
    shape = x.shape
    return sae.encode(x.reshape(-1, shape[-1])).reshape(*shape[:-1], sae.d_sae)


def decode(sae, f):
    """The SAE's reconstruction from latents f [..., d_sae] (no kernel: autograd runs through it)."""
    return f @ sae.W_dec + sae.b_dec


def split(sae, x):
    """(latents, error term) of x: ``decode(f) + e`` is x again."""
    f = _encode(sae, x)
    return f, x - decode(sae, f)


def hooked_run(model, tokens, hooks: dict, stop_at: str | None = None, capture=()):
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


@dataclasses.dataclass
class Acts:
    """Every hook's latents and error term on some prompts."""

    f: dict   # hook → [n, T, d_sae]
    e: dict   # hook → [n, T, d]


@torch.no_grad()
def node_values(model, group: SAEGroup, tokens) -> Acts:
    """Latents and error terms of every SAE of the group on these prompts (the spliced model = the model)."""
    _, got = hooked_run(model, tokens, {}, stop_at=group.hooks[-1], capture=group.hooks)
    f, e = {}, {}
    for h in group.hooks:
        if got[h].ndim != 3 or got[h].shape[-1] != group.saes[h].d_in:
            raise SaelabError(f"hook {h} gives {list(got[h].shape[2:])} per position, not the {group.saes[h].d_in} "
                              f"features SAE {group.folders[h]} reads: circuits need SAEs on hooks with one vector "
                              "per position (or per-head hooks such as attn.hook_z, read with the heads flattened)")
        f[h], e[h] = split(group.saes[h], got[h].float())
    return Acts(f, e)


def node_id(hook: str, latent: int | None) -> str:
    """A node's id in the circuit file: ``HOOK/LATENT``, or ``HOOK/error`` for the error term."""
    return f"{hook}/{'error' if latent is None else latent}"


def select_nodes(effects: dict, threshold: float) -> dict:
    """{hook: (latent indices LongTensor, keep_error bool)} with |effect| > threshold."""
    return {h: ((lat.abs() > threshold).nonzero().flatten(), abs(err) > threshold) for h, (lat, err) in effects.items()}


def count_nodes(sel: dict) -> tuple[int, int]:
    """(latent nodes, error nodes)."""
    return sum(len(i) for i, _ in sel.values()), sum(int(k) for _, k in sel.values())
