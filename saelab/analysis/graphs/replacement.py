"""The local replacement model of one prompt: the model made linear in its sources by freezing what is not.

The real forward of the prompt fixes every LayerNorm scale (``hook_scale``) and every attention pattern
(``hook_pattern``). With those frozen, LayerNorm is affine and attention is linear in the residual stream; each MLP
is replaced by its transcoder: its output becomes b_dec + Σ a_s W_dec,s (the active features s at that position)
+ an error vector (the real MLP output minus the transcoder's, so the replacement reproduces the real forward
exactly), plus a skip transcoder's linear path from the live MLP input. Over a cross-layer transcoder a layer's
output sums what the features of every layer up to it write there (each feature's decoder to that layer). Each
MLP without a transcoder is all error. Position 0, when it holds BOS, has no feature nodes: its MLP outputs are
errors (transcoders train without BOS rows).

What remains is an affine function of the sources — the token embeddings (token + position), the features'
activations and the errors — so every target (a feature's pre-activation, a logit minus the mean logit) is
Σ_sources (direct effect) + a constant, the target's value with every source zero (``bias``). A direct effect is
the source's vector dotted with the gradient of the target at the point where the source enters the residual
stream; gradients of ``batch`` targets are taken in one backward pass over as many copies of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.hooks import flat_hook, mlp_hooks


def decoders(coder, L: int) -> dict[int, torch.Tensor]:
    """{MLP layer m: the [d_sae, d] decoder into m's output} of the transcoder encoding layer L's MLP input: its
    own W_dec into L for a per-layer transcoder, one per later layer too for a cross-layer one (``CLTLayer``)."""
    return coder.decoders if hasattr(coder, "decoders") else {L: coder.W_dec}


@dataclass
class LayerNodes:
    """One MLP layer of the replacement: the active features its transcoder encodes, and its output's error."""

    layer: int
    coder: object | None  # the transcoder reading this MLP's input (None: the MLP's output is all error)
    positions: torch.Tensor  # [n] long: the position of each active feature
    features: torch.Tensor  # [n] long: its latent
    activations: torch.Tensor  # [n]: its activation a
    pre_activations: torch.Tensor  # [n]: its pre-activation z in the real forward
    writes: dict  # {MLP layer m: [n, d]}: each active feature's decoder row into m's output
    error: torch.Tensor  # [T, d]: the real MLP output minus the replacement's
    bias: torch.Tensor  # [d]: b_dec of this MLP's output (zeros without a transcoder)

    def keep(self, keep: torch.Tensor) -> None:
        """Only the features where ``keep`` [n] is True stay nodes."""
        self.positions, self.features = self.positions[keep], self.features[keep]
        self.activations, self.pre_activations = self.activations[keep], self.pre_activations[keep]
        self.writes = {m: w[keep] for m, w in self.writes.items()}


class Replacement:
    """The replacement model of ``tokens`` [T] (BOS first) with ``coders`` {layer: transcoder of that MLP}."""

    def __init__(self, model, coders: dict[int, object], tokens: torch.Tensor):
        self.model, self.coders = model, coders
        self.tokens = tokens.reshape(1, -1)
        self.n_layers = model.cfg.n_layers
        bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        self.bos_first = bos is not None and int(self.tokens[0, 0]) == int(bos)  # else position 0 has features too
        names = [n for n in model.hook_dict if n.endswith(("hook_scale", "hook_pattern"))]
        wanted = set(names) | {"hook_embed", "hook_pos_embed"} | {
            h for L in range(self.n_layers) for h in mlp_hooks(L)}
        with torch.no_grad():
            logits, cache = model.run_with_cache(self.tokens, names_filter=lambda n: n in wanted)
        self.logits = logits[0, -1].float()
        self.frozen = {n: cache[n].detach() for n in names if n in cache}
        self.embed = (cache["hook_embed"] + cache["hook_pos_embed"])[0].detach().float()  # [T, d]
        self._embed_parts = (cache["hook_embed"][0].detach(), cache["hook_pos_embed"][0].detach())
        self.layers = [self._layer(L, cache) for L in range(self.n_layers)]
        with torch.no_grad():  # the errors: what makes the replacement write each real MLP output exactly
            for n in self.layers:
                real = cache[mlp_hooks(n.layer)[1]][0].detach().float()
                skip = n.coder.skip_path(cache[mlp_hooks(n.layer)[0]][0].detach().float()) \
                    if getattr(n.coder, "skip", False) else 0
                n.error = real - self.inject(n.layer) - skip

    def _layer(self, L: int, cache) -> LayerNodes:
        real = cache[mlp_hooks(L)[1]][0].detach().float()  # [T, d]
        coder = self.coders.get(L)
        empty = torch.zeros(0, dtype=torch.long, device=real.device)
        if coder is None:
            return LayerNodes(L, None, empty, empty, real.new_zeros(0), real.new_zeros(0), {}, torch.zeros_like(real),
                              real.new_zeros(real.shape[-1]))
        x = cache[mlp_hooks(L)[0]][0].detach().float()
        with torch.no_grad():
            z = coder.pre_acts(x)
            f = coder.activation(z)
            if self.bos_first:
                f[0] = 0  # BOS: its MLP output is an error node
            pos, feat = f.nonzero(as_tuple=True)
            writes = {m: W[feat].detach().float() for m, W in decoders(coder, L).items()}
            return LayerNodes(L, coder, pos, feat, f[pos, feat], z[pos, feat], writes, torch.zeros_like(real),
                              coder.b_dec.detach().float())

    def inject(self, m: int) -> torch.Tensor:
        """What the replaced MLP of layer m writes at each position, skip path aside: its b_dec + the error + Σ a
        W_dec,m over the active features of every layer that writes to m ([T, d])."""
        out = self.layers[m].error + self.layers[m].bias
        for n in self.layers[: m + 1]:
            if m in n.writes and len(n.features):
                out = out.index_add(0, n.positions, n.activations[:, None] * n.writes[m])
        return out

    # -------------------------------------------------------------------------------------------- the linear run
    def run(self, batch: int, sources: str = "real", grad: bool = False):
        """The replacement over ``batch`` copies of the prompt: (logits [B, T, vocab], the live MLP inputs
        {layer: [B, T, d]} of the layers with a transcoder, the leaves {"embed": [B, T, d], layer: [B, T, d]}).
        ``sources``: "real" (the prompt's) or "zero" (every source zero: the targets' constant parts)."""
        B = batch
        zero = sources == "zero"
        tok, pos = self._embed_parts
        leaves = {"embed_tok": (torch.zeros_like(tok) if zero else tok).expand(B, -1, -1).clone(),
                  "embed_pos": (torch.zeros_like(pos) if zero else pos).expand(B, -1, -1).clone()}
        for n in self.layers:
            inj = n.bias.expand_as(n.error) if zero else self.inject(n.layer)
            leaves[n.layer] = inj.expand(B, -1, -1).clone().to(tok.dtype)
        if grad:
            for v in leaves.values():
                v.requires_grad_(True)
        live: dict[int, torch.Tensor] = {}

        def frozen(t, hook):
            return self.frozen[hook.name].expand(t.shape)

        def keep(L):
            def fn(flat):
                live[L] = flat
            return flat_hook(fn)

        def replace(L):
            def fn(t, hook):
                out = leaves[L]
                coder = self.coders.get(L)
                if coder is not None and getattr(coder, "skip", False):
                    out = out + coder.skip_path(live[L])
                return out.reshape(t.shape).to(t.dtype)
            return fn

        hooks = [(n, frozen) for n in self.frozen]
        hooks += [("hook_embed", lambda t, hook: leaves["embed_tok"]), ("hook_pos_embed", lambda t, hook: leaves["embed_pos"])]
        for L in range(self.n_layers):
            read, out = mlp_hooks(L)
            if L in self.coders:
                hooks.append((read, keep(L)))
            hooks.append((out, replace(L)))
        with torch.enable_grad() if grad else torch.no_grad():
            logits = self.model.run_with_hooks(self.tokens.expand(B, -1), fwd_hooks=hooks)
        return logits.float(), {L: v.float() for L, v in live.items()}, leaves
