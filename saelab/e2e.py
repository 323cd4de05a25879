"""End-to-end SAE training (Braun, Taylor, Goldowsky-Dill and Sharkey 2024, "Identifying Functionally Important
Features with End-to-End Sparse Dictionary Learning"): ``saelab train --objective kl`` (e2e) and ``kl+ds``
(e2e + downstream).

The SAE is spliced into the frozen model at its hook while it trains: each step runs the store's contexts through the
model once clean (no gradient: the logits, the activation the SAE reads, and for ``kl+ds`` every later layer's
residual stream) and once with the SAE's reconstruction in place of the activation (positions after BOS when BOS is
skipped), and the reconstruction term of the architecture's loss is replaced by

- ``kl``: ``kl_coeff · d_in · KL(clean ‖ spliced)``, the KL of the next-token distributions, mean over the spliced
  positions;
- ``kl+ds``: that, plus ``ds_coeff · d_in ·`` the mean over the later layers' ``hook_resid_post`` of
  ``‖a − â‖² / E‖a‖²`` (each layer's squared error as a fraction of its own squared norm).

The factor ``d_in`` puts both terms in the trainer's units, where a row's squared reconstruction error is of order
d_in, so the architecture's sparsity and auxiliary coefficients (and the target-L0 controllers) keep the weight they
have against the MSE. The model's weights take no gradient; the SAE's gradient flows back through the model's later
layers. The architecture's MSE is still computed and logged (``mse``), not trained on.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from saelab.errors import SaelabError
from saelab.hooks import flat_hook, forward

OBJECTIVES = ("mse", "kl", "kl+ds")
#: architectures e2e cannot train: their loss reads stored gradients (gradient) or reconstructs at several
#: widths (matryoshka's nested terms), which one spliced reconstruction does not replace
NOT_E2E = ("gradient", "matryoshka")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def downstream_hooks(hook: str, n_layers: int) -> list[str]:
    """The ``blocks.L.hook_resid_post`` hooks the forward reaches after ``hook``: every later layer's (and this
    layer's own, for a hook inside a block before its residual output)."""
    m = _LAYER.match(hook)
    first = 0 if m is None else int(m.group(1)) + (1 if hook.endswith("hook_resid_post") else 0)
    return [f"blocks.{layer}.hook_resid_post" for layer in range(first, n_layers)]


class ContextBatches:
    """Shuffled batches of whole contexts [n, T] (token ids, long) from a store's training split, epoch after epoch
    until ``steps`` batches were served; its state (epoch, batches served) makes ``--resume`` see the same batches.
    Each epoch's order is a permutation seeded by (seed, epoch)."""

    def __init__(self, tokens: np.ndarray, per_batch: int, steps: int, seed: int, device):
        self.tokens, self.per_batch, self.steps, self.seed, self.device = tokens, per_batch, steps, seed, device
        self.per_epoch = max(1, len(tokens) // per_batch)  # whole batches per epoch (a partial last one is dropped)
        self.served = 0

    @property
    def epochs(self) -> float:
        return self.served * self.per_batch / max(1, len(self.tokens))

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens))

    def __iter__(self):
        while self.served < self.steps:
            epoch, i = divmod(self.served, self.per_epoch)
            rows = np.sort(self._order(epoch)[i * self.per_batch:(i + 1) * self.per_batch])
            self.served += 1
            yield torch.from_numpy(self.tokens[rows].astype(np.int64)).to(self.device)

    def state_dict(self) -> dict:
        return {"served": self.served, "seed": self.seed, "per_batch": self.per_batch}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])


class Splice:
    """The clean and the spliced forwards of one objective: ``clean(tokens)`` → (the rows the SAE reads [n·(T −
    first), d_in], what ``loss`` needs of the clean pass); ``loss(x_hat, kept)`` → the objective's terms."""

    def __init__(self, model, hook: str, objective: str, first: int, kl_coeff: float, ds_coeff: float):
        self.model, self.hook, self.objective, self.first = model, hook, objective, first
        self.kl_coeff, self.ds_coeff = kl_coeff, ds_coeff
        self.down = downstream_hooks(hook, model.cfg.n_layers) if objective == "kl+ds" else []

    @torch.no_grad()
    def clean(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        kept: dict = {}

        def keep(name):
            return flat_hook(lambda a: kept.__setitem__(name, a.detach().float()))

        logits, _ = forward(self.model, tokens, [(h, keep(h)) for h in [self.hook, *self.down]])
        x = kept.pop(self.hook)
        shape = x.shape
        kept.update(logits=logits[:, self.first:].float(), shape=shape, tokens=tokens)
        return x[:, self.first:].reshape(-1, shape[-1]), kept

    def loss(self, x_hat: torch.Tensor, kept: dict) -> dict:
        b, t, d = kept["shape"]
        got: dict = {}

        def splice(act):
            new = act.clone()
            new[:, self.first:] = x_hat.reshape(b, t - self.first, d).to(act.dtype)
            return new

        def keep(name):
            return flat_hook(lambda a: got.__setitem__(name, a.float()))

        hooks = [(self.hook, flat_hook(splice))] + [(h, keep(h)) for h in self.down]
        logits, _ = forward(self.model, kept["tokens"], hooks)
        lp, lq = kept["logits"].log_softmax(-1), logits[:, self.first:].float().log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean()
        terms = {"kl": kl, "kl_term": self.kl_coeff * d * kl}
        if self.down:
            fracs = [((got[h] - kept[h])[:, self.first:].pow(2).sum(-1).mean()
                      / kept[h][:, self.first:].pow(2).sum(-1).mean().clamp_min(1e-12)) for h in self.down]
            terms["ds"] = torch.stack(fracs).mean()
            terms["ds_term"] = self.ds_coeff * d * terms["ds"]
        return terms


def check_store(store, objective: str) -> None:
    """A one-line error when ``store`` holds no model's text to splice an SAE into (a synthetic store)."""
    m = store.manifest
    if m.get("model") in (None, "", "synthetic"):
        raise SaelabError(f"--objective {objective} splices the SAE into the model the store was harvested from, and "
                          f"{store.path} holds no model's text (model {m.get('model')!r}): train it with --objective "
                          "mse, or harvest a store from a model")
