"""The logit lens of SAE latents: the direct path from an SAE's hook to the model's logits.

A direction at the hook (a decoder row, a sum of them) reaches the logits through the final LayerNorm's
centring and scale and ``W_U`` (for ``attn.hook_z``, first through that layer's ``W_O``); compatibility mode
folds the final LayerNorm's scale into ``W_U``, and an unfolded scale is applied here. ``direct_logits``
maps a few directions (steering's promoted tokens), ``logit_effects`` every latent of an SAE in chunks
(analyze's per-latent top and bottom tokens); neither forms a [d_in, vocab] matrix.
"""

from __future__ import annotations

import torch

from saelab.hooks import hook_layer

N_LOGITS = 10  # promoted and suppressed tokens kept per latent in features.h5
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                  "hook_embed")


def _direct_path_parts(model, sae):
    """The pieces of the direct path from the SAE's hook to the logits: (W_O [d_in, d_model] for ``attn.hook_z``
    (heads flattened head-major, as harvest stores them) else None, the final LN's scale [d_model] when
    compatibility mode has not folded it else None, whether the final LN centres its input, W_U [d_model, vocab]);
    None when the hook reaches the residual stream by no fixed linear map (hook_q, MLP pre-acts, …)."""
    hook = sae.cfg.output_hook or ""  # where the decoder writes (a transcoder's output hook)
    width = sae.cfg.output_dim
    if model is None:
        return None
    W_O = None
    if hook.endswith("attn.hook_z") and hook_layer(hook) is not None:
        W_O = model.blocks[hook_layer(hook)].attn.W_O.detach()  # [n_heads, d_head, d_model]
        W_O = W_O.reshape(-1, W_O.shape[-1])  # [n_heads · d_head, d_model], head-major as the store's rows
        if W_O.shape[0] != width:
            return None
    elif not any(hook.endswith(h) for h in RESIDUAL_HOOKS):
        return None
    W_U = model.W_U.detach()
    if W_U.shape[0] != (width if W_O is None else W_O.shape[1]):
        return None
    ln = getattr(model, "ln_final", None)
    w = getattr(ln, "w", None)
    if w is None:
        w = getattr(getattr(ln, "_original_component", None), "weight", None)
    scale = None
    if w is not None and not torch.allclose(w.float(), torch.ones_like(w.float())):
        scale = w.detach()  # not folded by compatibility mode: applied here
    center = getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre")
    return W_O, scale, center, W_U


def _apply_direct_path(parts, d: torch.Tensor) -> torch.Tensor:
    """``parts`` (``_direct_path_parts``) applied to directions ``d`` [..., d_in] → [..., vocab]: W_O, then the
    centring (LayerNorm: d ↦ d − mean(d)) and the scale on the d_model side, then W_U."""
    W_O, scale, center, W_U = parts
    r = d.to(W_U.device, torch.float32)
    if W_O is not None:
        r = r @ W_O.float()
    if center:
        r = r - r.mean(-1, keepdim=True)
    if scale is not None:
        r = r * scale.float()
    return r.to(W_U.dtype) @ W_U


def direct_logits(model, sae, d: torch.Tensor) -> torch.Tensor | None:
    """The direct path from the SAE's hook to the logits (through the final LN's scale and centring; for
    ``attn.hook_z`` first through that layer's W_O, as attention-SAE work reads a latent's direct logit effect)
    applied to directions ``d`` [..., d_in] → [..., vocab], without forming a [d_in, vocab] matrix. None when
    the hook has no direct path (``_direct_path_parts``)."""
    parts = _direct_path_parts(model, sae)
    return None if parts is None else _apply_direct_path(parts, d)


@torch.no_grad()
def logit_effects(model, sae, k: int = N_LOGITS, budget: int = 1 << 25):
    """(top ids, top values, bottom ids, bottom values) [d_sae, k] of every latent's direct logit effect
    (``direct_logits`` of its decoder row), or None when the hook has no direct path.

    Latents go in chunks of ``budget // vocab`` rows (at least 1): one chunk's [rows, vocab] float32 logits
    (128 MiB at the default) are the only vocabulary-wide temporary; no [d_in, vocab] matrix is formed, which
    for a 256k-token vocabulary would be gigabytes next to the model's own W_U."""
    parts = _direct_path_parts(model, sae)
    if parts is None:
        return None
    W_dec = sae.W_dec.detach()
    vocab = parts[3].shape[1]
    k = min(k, vocab)
    chunk = max(1, budget // vocab)
    out = [[], [], [], []]
    for c0 in range(0, W_dec.shape[0], chunk):
        L = _apply_direct_path(parts, W_dec[c0 : c0 + chunk]).float()
        tv, ti = L.topk(k, dim=1)
        bv, bi = L.topk(k, dim=1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv)):
            lst.append(t.to(W_dec.device))
    return tuple(torch.cat(t) for t in out)
