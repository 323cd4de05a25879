"""Latent matching between two SAEs: which latents of one SAE the other also learned.

Two SAEs of the same activation space (two seeds, two widths, two architectures, or two layers of the
residual stream) are compared by their decoder directions, the features they write back. For every latent of
A the latent of B whose decoder row has the highest cosine is its match, and the other way round:

- **MMCS** (mean max cosine similarity, Sharkey et al. 2022): the mean over A's latents of the cosine of
  their match in B; 1 when B holds every direction of A;
- the fraction of latents whose match reaches 0.9, 0.7 and 0.5;
- **mutual matches**: pairs that are each other's match (a one-to-one correspondence), and how many of
  them reach 0.9.

Two SAEs trained with the same seed start from the same decoder directions (latent i of both begins as the
same random vector; a group's SAEs are trained so), and part of their similarity is that shared start, not
what they learned: ``same_index`` counts the latents whose match is the latent of the same index (by chance
about one), and ``saelab compare`` says so when it is more than 5% of them.

MMCS has a floor that is not zero: a unit vector's best cosine among n random directions in d dimensions grows
with n and shrinks with d (well above zero for a wide dictionary in few dimensions). ``chance`` gives that
floor per direction, measured on isotropic random directions of B's count and d_in (``chance_mmcs``); real
activations are not isotropic, so unrelated SAEs of one space can sit somewhat above it.

Dead latents keep their random init direction and match nothing, which lowers MMCS for a reason that is
not about the features learned; when a side has ``features.h5`` (``saelab analyze``), the same numbers are
also given over its latents that fired. A signed SAE (AbsTopK) reads a feature with either sign of its
direction, so when either side is signed the cosines are absolute. Cosines go in chunks
(``geometry.best_matches``): at most 128 MiB of them at a time whatever the widths."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch

from saelab.errors import SaelabError
from saelab.targets import local_group, pick_sae

LEVELS = (0.9, 0.7, 0.5)


def _side(cos: np.ndarray, alive: np.ndarray | None) -> dict:
    """The summary of one direction's best-match cosines (over all latents, and over the alive ones)."""
    out = {"latents": int(len(cos)), "mmcs": float(cos.mean()), "median": float(np.median(cos)),
           **{f"frac_{t}": float((cos >= t).mean()) for t in LEVELS}}
    if alive is not None:
        out["alive"] = int(alive.sum())
        a = cos[alive]
        out["mmcs_alive"] = float(a.mean()) if len(a) else float("nan")
        out.update({f"frac_{t}_alive": float((a >= t).mean()) if len(a) else float("nan") for t in LEVELS})
    return out


def chance_mmcs(d_in: int, n: int, signed: bool = False, rows: int = 1024, seed: int = 0,
                budget: int = 1 << 25) -> float:
    """The MMCS of ``rows`` random unit vectors against ``n`` random directions in ``d_in`` dimensions (isotropic,
    seeded): the MMCS that a dictionary of ``n`` directions unrelated to the other's would get by chance."""
    from saelab.analysis.geometry import best_matches

    g = torch.Generator().manual_seed(seed)
    _, cos = best_matches(torch.randn(rows, d_in, generator=g), torch.randn(n, d_in, generator=g), 1, budget,
                          signed=signed)
    return float(cos.mean())


def compare_saes(a, b, *, alive_a: np.ndarray | None = None, alive_b: np.ndarray | None = None,
                 budget: int = 1 << 25, device: str | torch.device | None = None) -> dict:
    """Match the latents of SAEs ``a`` and ``b`` by decoder cosine. ``alive_a`` / ``alive_b``: boolean masks of
    the latents that fired (from ``features.h5``), for the alive-only numbers. Returns a JSON-ready dict:
    ``a_to_b`` / ``b_to_a`` (summary per direction), ``mutual`` and ``mutual_0.9`` (counts), ``same_index`` (A's
    latents whose match in B has the same index: a shared init when many), ``chance_mmcs`` (per direction: the
    MMCS of random directions, ``chance_mmcs``), ``signed``, and
    ``matches`` {``a_to_b``: {``ids``, ``cos``}, ``b_to_a``: …} (per latent, as lists). ``device``: where the
    cosines are computed (default: where the decoders are; "cuda" for wide SAEs, the products are the cost)."""
    from saelab.analysis.geometry import decoder_matches, either_signed

    if a.cfg.output_dim != b.cfg.output_dim:  # decoders live where they write (a transcoder: its output hook)
        raise SaelabError(f"the decoders write different spaces (width {a.cfg.output_dim} and {b.cfg.output_dim}): "
                          "compare SAEs or transcoders whose decoders write one model's activations of one width")
    for name, mask, sae in (("alive_a", alive_a, a), ("alive_b", alive_b, b)):
        if mask is not None and len(mask) != sae.d_sae:
            raise SaelabError(f"{name} has {len(mask)} entries for an SAE of {sae.d_sae} latents")
    signed = either_signed(a, b)
    ia, ca = decoder_matches(a, b, 1, budget=budget, device=device)
    ib, cb = decoder_matches(b, a, 1, budget=budget, device=device)
    ia, ca, ib, cb = (t[:, 0].numpy() for t in (ia, ca, ib, cb))
    mutual = ib[ia] == np.arange(len(ia))  # A's latent i and its match j are each other's match
    chance = {n: chance_mmcs(a.d_in, n, signed, budget=budget) for n in {a.d_sae, b.d_sae}}  # once when equal
    return {"signed": signed, "same_index": int((ia == np.arange(len(ia))).sum()),
            "chance_mmcs": {"a_to_b": chance[b.d_sae], "b_to_a": chance[a.d_sae]},
            "a_to_b": _side(ca, None if alive_a is None else np.asarray(alive_a, bool)),
            "b_to_a": _side(cb, None if alive_b is None else np.asarray(alive_b, bool)),
            "mutual": int(mutual.sum()), "mutual_0.9": int((mutual & (ca >= 0.9)).sum()),
            "matches": {"a_to_b": {"ids": ia.tolist(), "cos": ca.tolist()},
                        "b_to_a": {"ids": ib.tolist(), "cos": cb.tolist()}}}


def _alive(folder) -> np.ndarray | None:
    """The latents that fired, from the folder's ``features.h5``; None for a hub spec or an unanalysed SAE."""
    from saelab.analysis.features.db import FeatureDB
    from saelab.layout import FEATURES_FILE

    if not isinstance(folder, pathlib.Path) or not (folder / FEATURES_FILE).exists():
        return None
    with FeatureDB(folder) as db:
        return db.density > 0


@dataclasses.dataclass(frozen=True)
class Side:
    """One SAE of a comparison: where it was given (a folder or a hub spec), the SAE, the model it belongs to."""

    where: object
    sae: object
    model: str | None

    def who(self) -> dict:
        """This side as the comparison's JSON names it."""
        c = self.sae.cfg
        return {"sae": str(self.where), "arch": c.arch, "d_sae": self.sae.d_sae, "hook": c.hook_name,
                "model": self.model}


def load_pair(sae, other, hook: str | None = None, other_hook: str | None = None,
              other_model: bool = False) -> tuple[Side, Side]:
    """Both SAEs of a comparison (folders, group folders with ``hook`` / ``other_hook``, or ``hf://`` specs; nothing
    is written next to them); SAEs of different models are refused (their directions live in different spaces),
    unless ``other_model`` (universality, which compares them through their activations)."""
    a, b = Side(*pick_sae(sae, hook)), Side(*pick_sae(other, other_hook, "--other-hook"))
    for side in (a, b):
        side.sae.one_layer("saelab compare")
    if not other_model and not one_model(a, b):
        raise SaelabError(f"the SAEs belong to different models ({a.model} and {b.model}): their directions live "
                          "in different spaces; compare SAEs of one model")
    return a, b


def one_model(a: Side, b: Side) -> bool:
    """Whether the two sides belong to one model (or either names none)."""
    from saelab.models import same_model

    return not (a.model and b.model) or same_model(a.model, b.model)


def compare_sides(a: Side, b: Side, budget: int = 1 << 25, device="cpu") -> dict:
    """``compare_saes`` of two loaded sides, over their alive latents too where they have ``features.h5``; the
    result names both sides (``a``, ``b``)."""
    res = compare_saes(a.sae, b.sae, alive_a=_alive(a.where), alive_b=_alive(b.where), budget=budget, device=device)
    return {"a": a.who(), "b": b.who(), **res}


def shared_hooks(sae, other) -> tuple[dict, dict, list[str]] | None:
    """For two local group folders of several SAEs each (two runs of one group: two seeds, two widths): ({hook: SAE
    folder} of each, the hooks both hold, in A's order); None when either is one SAE or a hub spec. Groups that
    share no hook are refused."""
    ga, gb = local_group(sae), local_group(other)
    if not (ga and gb):
        return None
    common = [h for h in ga if h in gb]
    if not common:
        raise SaelabError(f"the groups {sae} ({', '.join(ga)}) and {other} ({', '.join(gb)}) share no hook: "
                          "pass --hook and --other-hook to compare one SAE of each")
    return ga, gb, common
