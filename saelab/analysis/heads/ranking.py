"""``HeadRanking``: every attention head with its score, best first — what either method returns."""

from __future__ import annotations

import numpy as np

from saelab.errors import SaelabError


class HeadRanking(list):
    """``[(layer, head, score)]``, best first, plus what produced it.

    ``method`` ("codes" or "ablation"), ``seconds`` (wall clock of the whole method on these
    examples, model loading and task building excluded), ``scores`` [n_layers, n_heads] (numpy),
    ``n_examples``, ``info`` (method-specific numbers: per-stage times, code counts, …).
    """

    def __init__(self, items, *, method: str, seconds: float, scores: np.ndarray, n_examples: int,
                 info: dict | None = None):
        super().__init__(items)
        self.method, self.seconds, self.scores = method, seconds, scores
        self.n_examples, self.info = n_examples, info or {}

    def heads(self, top: int | None = None) -> list[tuple[int, int]]:
        return [(layer, head) for layer, head, _ in self[:top]]

    def rank_of(self, layer: int, head: int) -> int:
        """1-based rank of a head by score, ties sharing the best rank (1 + heads with a higher score):
        the code counts are integers up to n, so several heads can tie."""
        score = self._score(layer, head)
        return 1 + sum(s > score for _, _, s in self)

    def tied_with(self, layer: int, head: int) -> int:
        """How many other heads have exactly this head's score."""
        score = self._score(layer, head)
        return sum(s == score for _, _, s in self) - 1

    def _score(self, layer: int, head: int):
        for l, h, s in self:
            if (l, h) == (layer, head):
                return s
        n_l, n_h = 1 + max(l for l, _, _ in self), 1 + max(h for _, h, _ in self)
        raise SaelabError(f"no head ({layer}, {head}) in this ranking: the model has layers 0..{n_l - 1} and "
                          f"heads 0..{n_h - 1}; pass (layer, head) in those ranges")

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds": self.seconds, "n_examples": self.n_examples,
                "ranking": [{"layer": l, "head": h, "score": s} for l, h, s in self],
                "info": self.info}


def rank_heads(scores: np.ndarray, tiebreak: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """Heads sorted by score (then tiebreak) descending, then by (layer, head)."""
    n_layers, n_heads = scores.shape
    keys = [(-float(scores[l, h]), -float(tiebreak[l, h]) if tiebreak is not None else 0.0, l, h)
            for l in range(n_layers) for h in range(n_heads)]
    return [(l, h, float(scores[l, h])) for _, _, l, h in sorted(keys)]
