"""The ``stability`` suite: how alike the dictionaries of SAEs are that differ only by their training seed.

For each pair of SAEs, their decoder rows are matched one to one by the Hungarian algorithm on their cosines
(``matching.matched_cosines``; |cosine| for signed architectures, whose latents may flip); the pair scores the
mean matched cosine and the fraction of its latents matched above ``THRESHOLD``. Over several pairs the suite
reports the mean and the spread (min, max): Chanin et al. 2026 find reseed noise larger than assumed, so one
pair is not enough to compare SAEs by. Scores are rounded to 9 decimals: float noise below that is no
difference between dictionaries (an SAE against itself scores 1.0).
"""

from __future__ import annotations

import itertools

from saelab.errors import SaelabError
from saelab.suites.matching import matched_cosines

THRESHOLD = 0.9


def pair_stability(a, b) -> dict:
    """{"mean_cos", "frac_above"} of the decoders of SAEs ``a`` and ``b`` (same d_in and width)."""
    if a.W_dec.shape != b.W_dec.shape:
        raise SaelabError(f"stability compares SAEs of one shape: {tuple(a.W_dec.shape)} against "
                          f"{tuple(b.W_dec.shape)} (d_sae, d_in); pass SAEs trained with the same settings")
    signed = bool(getattr(a, "signed", False) or getattr(b, "signed", False))
    cos, _, _ = matched_cosines(a.W_dec, b.W_dec, absolute=signed)
    return {"mean_cos": round(float(cos.mean()), 9), "frac_above": round(float((cos > THRESHOLD).mean()), 9)}


def stability(saes: list) -> dict:
    """The stability of a set of SAEs (at least two): every pair's scores, their mean and spread."""
    if len(saes) < 2:
        raise SaelabError("stability needs at least two SAEs: pass the others with --against")
    pairs = [pair_stability(a, b) for a, b in itertools.combinations(saes, 2)]
    means = [p["mean_cos"] for p in pairs]
    return {"mean_cos": round(sum(means) / len(means), 9), "min_cos": min(means), "max_cos": max(means),
            "frac_above": round(sum(p["frac_above"] for p in pairs) / len(pairs), 9), "threshold": THRESHOLD,
            "n_saes": len(saes), "n_pairs": len(pairs)}
