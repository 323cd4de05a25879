"""Every attention head's ``hook_z`` output on a batch of prompts, from one early-stopped forward."""

from __future__ import annotations

import torch

from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.hooks import forward

HOOK = "blocks.{layer}.attn.hook_z"
POSITIONS = ("last", "mean")


@torch.no_grad()
def head_activations(model, tokens: torch.Tensor, position: str = "last", batch_size: int = 64) -> torch.Tensor:
    """Every head's ``hook_z`` output, [N, n_layers * n_heads, d_head] (head g = layer * n_heads + head): a
    transposed view of a head-major [n_layers * n_heads, N, d_head] float32 buffer (``.transpose(0, 1)`` gives
    it back, contiguous).

    One forward per batch, stopped right after the deepest ``hook_z`` (``saelab.hooks.forward``: the last MLP,
    ln_final and the unembedding never run); each hook copies only the position(s) it needs straight into the
    buffer."""
    if position not in POSITIONS:
        raise SaelabError(f"position '{position}' is not one of {', '.join(POSITIONS)}")
    cfg = model.cfg
    n_heads, d_head = cfg.n_heads, cfg.d_head
    hooks = [HOOK.format(layer=l) for l in range(cfg.n_layers)]
    dev = device_of(model)
    out = torch.empty(cfg.n_layers * n_heads, len(tokens), d_head, device=dev)
    batch = slice(0, 0)  # the rows of the batch running now
    seen: set[int] = set()

    def make(layer):
        rows = out[layer * n_heads : (layer + 1) * n_heads]  # [n_heads, N, d_head]

        def keep(z, hook):
            kept = z[:, -1] if position == "last" else z[:, 1:].mean(1)
            rows[:, batch].copy_(kept.reshape(len(kept), n_heads, d_head).transpose(0, 1))
            seen.add(layer)

        return keep

    fwd_hooks = [(h, make(l)) for l, h in enumerate(hooks)]
    for a in range(0, len(tokens), batch_size):
        batch = slice(a, min(a + batch_size, len(tokens)))
        seen.clear()
        forward(model, tokens[batch].to(dev), fwd_hooks, stop_after=hooks)
        if len(seen) < len(hooks):
            raise SaelabError(f"the model's forward never reached "
                              f"{', '.join(h for l, h in enumerate(hooks) if l not in seen)}: "
                              "head identification needs every layer's attn.hook_z")
    return out.transpose(0, 1)
