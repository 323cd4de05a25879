"""p-annealing SAE (dictionary_learning's ``PAnnealTrainer``; Karvonen et al. 2024, "Measuring Progress in
Dictionary Learning for Language Model Interpretability with Board Game Models"): a ReLU SAE with unit-norm decoder
rows whose sparsity penalty is the Lp norm of its codes, ‖f‖_p = (Σᵢ fᵢ^p)^(1/p) (``--p-penalty lp``) or its p-th
power Σᵢ fᵢ^p (``lp^p``), with p annealed from ``p_start`` towards ``p_end``: an L1 penalty early (convex, easy to
train), one closer to L0 late (it no longer shrinks the large activations).

The schedule (``p_schedule``): ``p_updates`` update steps evenly spaced from ``anneal_start`` of the run to its
last step, and the values p = linspace(p_start, p_end, p_updates); at update i p takes the i-th value. Each change
of p rescales the coefficient λ by the mean penalty at the old p over the mean at the new p on the last
``QUEUE`` steps (both measured on the same codes), so the penalty's size carries over the change as
dictionary_learning does. λ itself starts from ``l1_coeff`` or, by default, follows the target-L0 controller as
the ReLU SAE's does (the rescaling moves the controller's λ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saelab.kernels.sparse_codes import SparseCodes
from saelab.sae.base import mse
from saelab.sae.relu import ReluSAE

#: steps whose penalties at the current and the next p rescale λ when p changes
QUEUE = 10


def p_schedule(cfg, total_steps: int) -> tuple[list[int], list[float]]:
    """(the steps after which p changes, the value p takes at each), ``cfg.p_updates`` of each."""
    n = cfg.p_updates
    first, last = int(cfg.anneal_start * total_steps), max(0, total_steps - 1)
    steps = [round(first + (last - first) * i / (n - 1)) for i in range(n)]
    values = [cfg.p_start + (cfg.p_end - cfg.p_start) * i / (n - 1) for i in range(n)]
    return steps, values


def lp_penalty(f, p: float, form: str) -> torch.Tensor:
    """The mean over rows of ‖f‖_p (``form`` "lp") or Σᵢ fᵢ^p ("lp^p"), for codes f ≥ 0: dense [B, d_sae], or
    SparseCodes of positive values."""
    s = f.row_sums(f.values.pow(p)) if isinstance(f, SparseCodes) else f.pow(p).sum(-1)
    return (s if form == "lp^p" else s.pow(1.0 / p)).mean()


class PAnnealSAE(ReluSAE):
    arch = "panneal"
    constrain_decoder = True  # dictionary_learning's ConstrainedAdam: the penalty reads the codes alone
    saelens_arch = "standard"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("p_index", torch.tensor(0))  # updates reached: p is the value of update p_index − 1
        self.register_buffer("queue", torch.zeros(QUEUE, 2))  # (penalty at p, at the next p) of recent steps
        self.register_buffer("queued", torch.tensor(0))

    def _schedule(self):
        return p_schedule(self.cfg, self.total_steps)

    def current_p(self) -> float:
        i = int(self.p_index)
        return self.cfg.p_start if i == 0 else self._schedule()[1][i - 1]

    def next_p(self) -> float | None:
        """The value p takes at the next update, None after the last one."""
        i, values = int(self.p_index), self._schedule()[1]
        return values[i] if i < len(values) else None

    def loss(self, x, step=0, grads=None, target=None):
        f = self.sparse_codes(x, 0.0)  # the entries z > 0 (sparse), or None: the dense codes
        if f is None:
            f = F.relu(self.pre_acts(x))
            x_hat = self.decode(f)
        else:
            x_hat = f.decode(self.W_dec, self.b_dec)
        lp = lp_penalty(f, self.current_p(), self.cfg.p_penalty)
        out = self._out(f, x_hat, mse=mse(x if target is None else target, x_hat),
                        lp=self.control.coeff * self.sparsity_warmup(step) * lp)
        out["p"] = torch.tensor(self.current_p())  # logged with the step's metrics (not a loss term)
        nxt = self.next_p()
        self._pair = None  # (penalty at p, at the next p) of this step's codes, for after_step
        if self.training and nxt is not None:
            with torch.no_grad():
                self._pair = torch.stack([lp.detach(), lp_penalty(f.detach(), nxt, self.cfg.p_penalty)])
        return out

    @torch.no_grad()
    def after_step(self, out: dict, step: int, reduce=None) -> None:
        super().after_step(out, step, reduce)
        pair = getattr(self, "_pair", None)
        if pair is not None:
            if reduce is not None:  # every rank keeps the same λ
                pair = reduce.mean(pair)
            self.queue[int(self.queued) % QUEUE] = pair.float().to(self.queue.device)
            self.queued += 1
        steps, _ = self._schedule()
        i = int(self.p_index)
        if i < len(steps) and step >= steps[i]:
            n = min(int(self.queued), QUEUE)
            if i > 0 and n:  # λ · (penalty at the old p) / (penalty at the new p), on the same recent codes
                old, new = self.queue[:n].mean(0).tolist()
                if old > 0 and new > 0 and math.isfinite(old / new):
                    self.control.log_coeff += math.log(old / new)
            self.p_index += 1
            self.queued.zero_()
