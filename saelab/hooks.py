"""Hook names and hooked forwards: the small vocabulary every module that touches a model speaks.

- the grammar of TransformerLens hook names (``blocks.L.…``; the hooks a model never runs with
  saelab's options; globs expanded against a model);
- ``forward``: one hooked forward, stopped as soon as the hooks it needs have run (nothing after the
  deepest of them is computed, not even the rest of its block, ln_final or the unembedding);
  ``activation_at``: the activation at one hook from such a forward;
- ``flat_hook`` / ``flat_rows``: one view of an activation for every splice and store, as
  [batch, pos, features] (``attn.hook_z``'s heads flattened head-major), given back to the model in
  its own shape.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from saelab.errors import SaelabError

if TYPE_CHECKING:  # hook names are read where torch is not loaded (the CLI's parser, configs): annotations only
    import torch

_LAYER = re.compile(r"^blocks\.(\d+)\.")


#: an MLP's input and output hooks, as format strings of the layer L: the pair a transcoder of that MLP reads and
#: writes (``harvest --pairs mlp``, the replacement model of attribution graphs)
MLP_PAIR = ("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out")


def mlp_hooks(L: int) -> tuple[str, str]:
    """(the MLP's input hook, its output hook) of layer L."""
    return MLP_PAIR[0].format(L=L), MLP_PAIR[1].format(L=L)


def mlp_layer(read: str, write: str) -> int | None:
    """The layer L whose MLP a transcoder from ``read`` to ``write`` replaces, or None when they are not one MLP's
    input and output."""
    L = hook_layer(read)
    return L if L is not None and (read, write) == mlp_hooks(L) else None


def hook_layer(name: str) -> int | None:
    """The block index of a hook name (blocks.L.…), or None for embed / ln_final / unembed hooks."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


# hooks TransformerLens only runs when a config option is on (saelab loads models with them off): the option, and
# the hook that carries the same values
_GATED = {"hook_mlp_in": ("use_hook_mlp_in", "blocks.L.ln2.hook_normalized (the MLP's input)"),
          "hook_attn_in": ("use_attn_in", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "hook_q_input": ("use_split_qkv_input", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "hook_k_input": ("use_split_qkv_input", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "hook_v_input": ("use_split_qkv_input", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "attn.hook_result": ("use_attn_result", "blocks.L.attn.hook_z (each head's output before W_O)"),
          "hook_tokens": ("use_hook_tokens", "hook_embed")}


def switched_off(model, name: str) -> tuple[str, str] | None:
    """(option, alternative hook) when ``name`` is a hook this model never runs because a TransformerLens option is
    off, else None."""
    for suffix, (option, alt) in _GATED.items():
        if name.endswith(suffix) and getattr(model.cfg, option, True) is False:
            return option, alt
    return None


def expand_hooks(model, hooks: list[str]) -> list[str]:
    """Validate hook names against the model (globs allowed), keeping the user's order.

    An unknown name raises SaelabError listing the closest valid names; a hook the model does not run (an option of
    TransformerLens is off) one naming the hook with the same values. Globs leave those out.
    """
    valid = list(model.hook_dict.keys())
    out: list[str] = []
    for h in hooks:
        if h in model.hook_dict and (off := switched_off(model, h)):
            option, alt = off
            if hook_layer(h) is not None:
                alt = alt.replace("blocks.L.", f"blocks.{hook_layer(h)}.")
            raise SaelabError(f"hook '{h}' never runs in this model (TransformerLens's {option} is off): harvest "
                              f"{alt} instead")
        if any(c in h for c in "*?["):
            matches = [v for v in valid if fnmatch.fnmatchcase(v, h) and not switched_off(model, v)]
            matches.sort(key=lambda v: (hook_layer(v) if hook_layer(v) is not None else -1, v))
            if not matches:
                raise SaelabError(f"hook pattern '{h}' matches no hook of this model; e.g. {', '.join(valid[:4])}")
            out += [m for m in matches if m not in out]
        elif h in model.hook_dict:
            if h not in out:
                out.append(h)
        else:
            close = difflib.get_close_matches(h, valid, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid names look like {', '.join(valid[:3])}"
            raise SaelabError(f"unknown hook '{h}' for this model: {hint}")
    return out


# ------------------------------------------------------------------------ forwards
class StopForward(Exception):
    """Raised once the last hook a forward needs has run, so the rest of the model is never computed."""


HookFn = Callable[["torch.Tensor", object], "torch.Tensor | None"]


def forward(model, tokens: torch.Tensor, fwd_hooks: Iterable[tuple[str, HookFn]],
            stop_after: Iterable[str] = ()) -> tuple[torch.Tensor | None, set[str]]:
    """Run ``model`` on ``tokens`` with ``fwd_hooks`` [(hook name, fn(act, hook) -> act or None)]; returns (the
    logits, the names of the hooks that ran). With ``stop_after`` (hook names), the forward stops as soon as
    each of them has run, and the logits are None: the callers that need activations only, not logits."""
    stop = set(stop_after)
    reached: set[str] = set()
    hooks = list(fwd_hooks)
    names = {n for n, _ in hooks}
    hooks += [(n, None) for n in stop - names]

    def wrap(name, fn):
        def hook_fn(act, hook):
            if fn is not None:
                new = fn(act, hook)
                act = act if new is None else new
            reached.add(name)
            if stop and stop <= reached:
                raise StopForward
            return act

        return hook_fn

    try:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, wrap(n, fn)) for n, fn in hooks])
    except StopForward:
        logits = None
    return logits, reached


def check_reached(hooks: Iterable[str], reached: set[str], why: str = "choose hooks this model computes") -> None:
    """A one-line error naming the hooks a forward never reached."""
    missing = sorted(set(hooks) - reached)
    if missing:
        raise SaelabError(f"the model's forward never reached hook(s) {', '.join(missing)}: {why}")


def activation_at(model, tokens: torch.Tensor, hook: str, why: str = "choose hooks this model computes"):
    """The activation at ``hook`` ([batch, pos, features], ``flat_hook``'s view) of ``tokens``, from a forward that
    stops right after it; a hook the forward never reaches is a one-line error ending in ``why``."""
    kept: dict = {}
    _, reached = forward(model, tokens, [(hook, flat_hook(lambda a: kept.__setitem__("x", a)))], stop_after=[hook])
    check_reached([hook], reached, why)
    return kept["x"]


def flat_hook(fn: Callable[[torch.Tensor], torch.Tensor | None]) -> HookFn:
    """A hook function that shows ``fn`` the activation as [batch, pos, features] (``attn.hook_z``'s [batch, pos,
    heads, d_head] flattened head-major, as stores hold it and SAEs read it) and gives the model ``fn``'s result
    back in the model's own shape (None: the activation unchanged)."""
    def hook_fn(act, hook):
        new = fn(act.flatten(2))
        return act if new is None else new.reshape(act.shape)

    return hook_fn


def relay(read: str, write: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]) -> list:
    """Forward hooks for a map from one hook to a later one (a transcoder's input to its output): the activation
    at ``read`` is kept as the forward passes it, and at ``write`` the model gets ``fn(kept, flat)`` (both [batch,
    pos, features], ``flat_hook``'s view; None: unchanged). With ``read == write`` fn gets the activation twice."""
    if read == write:
        return [(write, flat_hook(lambda flat: fn(flat, flat)))]
    kept: dict = {}

    def keep(flat):
        kept["x"] = flat

    return [(read, flat_hook(keep)), (write, flat_hook(lambda flat: fn(kept.pop("x"), flat)))]


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """[batch, pos, ...] → [batch·pos, features], a store's rows (hook_z heads flattened head-major)."""
    return t.reshape(t.shape[0] * t.shape[1], -1)
