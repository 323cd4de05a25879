"""Target-L0 control of a sparsity coefficient (ReLU's L1, JumpReLU's L0).

When no fixed coefficient is given, λ is adapted multiplicatively after each step towards the
target mean L0 (``--k``): λ ← λ·exp(η·clip((L0 − k)/k, −1, 1)), on an EMA of L0. This is the
controller idea of dictionary_learning's target-L0 penalty and the Matryoshka reference code,
so architectures can be compared at equal L0. λ lives in a buffer, so checkpoints keep it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SparsityController(nn.Module):
    def __init__(self, fixed: float | None, init: float, target: float, rate: float = 0.02, ema: float = 0.9):
        super().__init__()
        self.adaptive = fixed is None
        self.target, self.rate, self.ema = float(target), rate, ema
        self.register_buffer("log_coeff", torch.tensor(math.log(fixed if fixed is not None else init)))
        self.register_buffer("l0_ema", torch.tensor(-1.0))

    @property
    def coeff(self) -> float:
        return float(self.log_coeff.exp())

    @torch.no_grad()
    def update(self, l0: torch.Tensor) -> None:
        if not self.adaptive:
            return
        l0 = float(l0)
        self.l0_ema.fill_(l0 if self.l0_ema < 0 else self.ema * float(self.l0_ema) + (1 - self.ema) * l0)
        err = max(-1.0, min(1.0, (float(self.l0_ema) - self.target) / self.target))
        self.log_coeff += self.rate * err
