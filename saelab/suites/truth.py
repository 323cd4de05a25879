"""The ``truth`` suite: how well an SAE trained on a planted-feature store (``saelab synthetic``) recovers the
features planted in it, scored as SAELens's synthetic benchmark (SynthSAEBench) scores it.

- ``mcc``: the mean |cosine| of decoder rows and planted directions matched one to one by the Hungarian
  algorithm (the mean correlation coefficient of "Mechanistic Interpretability Should Prioritize Feature
  Consistency in SAEs", arXiv 2505.20254); ``mmcs``: the mean over planted features of their best |cosine| with
  any decoder row (many latents may share one feature).
- ``uniqueness``: the distinct planted features that the latents' best matches cover, over the latents.
- ``precision`` / ``recall`` / ``f1`` / ``accuracy``: each latent's firing (code ≠ 0) read as a detector of its
  best-matching planted feature firing (coefficient ≠ 0), over the store's held-out rows; per-latent values,
  0 where undefined, averaged over latents.
- ``dead_latents``: latents that fire on none of those rows; ``true_l0`` / ``sae_l0``: features / latents
  active per row.
- ``mean_absorption_fraction_score`` / ``mean_full_absorption_score`` (stores with a planted hierarchy): SAEBench's
  absorption scores (``suites.absorption.row_absorption``) of each parent over the rows where it fires, its
  direction the property's, its main latent the one its direction matches best, averaged over the parents.

The planted coefficients of a row are drawn again from the store's seed (``synthetic.truth_codes``), and the
rows they make are checked against the store's own before anything is scored.
"""

from __future__ import annotations

import numpy as np
import torch

from saelab.errors import SaelabError
from saelab.suites.absorption import absorption
from saelab.suites.matching import cosines, match
from saelab.synthetic import TRUTH_NPY, load_truth, truth_codes

#: rows scored (the first of the held-out shards, else of the store)
ROWS = 65_536


def rows_of(store, limit: int = ROWS) -> np.ndarray:
    """The global ids of the rows a suite scores: the held-out shards' rows (all shards' where none is held out),
    the first ``limit``."""
    shards = store.split_shards("holdout") or store.split_shards("all")
    ids = [np.arange(store.shards[i]["first_row"], store.shards[i]["first_row"] + store.shards[i]["rows"])
           for i in shards]
    return np.concatenate(ids)[:limit] if ids else np.zeros(0, np.int64)


def truth_scores(sae, store, rows: int = ROWS, batch: int = 4096, target=None) -> dict:
    """The truth suite's scores (see the module docstring) of ``sae`` on the synthetic ``store``. A transcoder's
    decoder is matched to the planted directions of its ``target`` store (``synthetic --d-out``: the same
    coefficients, other directions), its codes read from ``store``'s rows."""
    sae.one_layer("the truth suite")
    for st in (store, target) if target is not None else (store,):
        if not (st.path / TRUTH_NPY).exists():
            raise SaelabError(f"the truth suite scores SAEs of planted-feature stores: {st.path} holds no "
                              f"{TRUTH_NPY} (write one with `saelab synthetic`, or leave truth out of --suite)")
    directions, info = load_truth((target or store).path)
    dec = sae.W_dec.detach().float().cpu()
    if dec.shape[1] != directions.shape[1]:
        raise SaelabError(f"the SAE reads d_in {dec.shape[1]}, the store's features have {directions.shape[1]}: "
                          "pass the store it was trained on")
    cos = cosines(dec, directions, absolute=True)
    matched, _, _ = match(cos)
    best = torch.from_numpy(cos.argmax(1))
    ids = rows_of(store, rows)
    coef, x = truth_codes(store.path, ids)
    stored = store.rows(ids).float()
    if not torch.allclose(x, stored, atol=1e-2 * float(x.abs().max().clamp_min(1))):
        raise SaelabError(f"{store.path}: its rows are not the ones its truth.json draws (the store was changed, or "
                          "written by another saelab): write it again with `saelab synthetic`")
    d = len(dec)
    parents = sorted(info.get("hierarchy") or {})
    absorbed: dict[int, list] = {p: [[], []] for p in parents}  # per parent: codes and projections where it fires
    tp = fp = fn = tn = torch.zeros(d, dtype=torch.float64)
    fired = torch.zeros(d, dtype=torch.bool)
    sae_l0 = 0.0
    with torch.no_grad():
        for a in range(0, len(ids), batch):
            codes = sae.encode(stored[a : a + batch].to(sae.W_dec.device)).cpu()
            on = codes != 0
            truth_on = coef[a : a + batch][:, best] != 0
            tp = tp + (on & truth_on).sum(0)
            fp = fp + (on & ~truth_on).sum(0)
            fn = fn + (~on & truth_on).sum(0)
            tn = tn + (~on & ~truth_on).sum(0)
            fired |= on.any(0)
            sae_l0 += float(on.sum())
            for p in parents:  # codes where the parent fires, and the projection onto its direction of the rows
                here = coef[a : a + batch][:, p] > 0  # the SAE reconstructs (c · directions: either side of a pair)
                absorbed[p][0].append(codes[here])
                absorbed[p][1].append(coef[a : a + batch][here] @ (directions @ directions[p]))
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300), 0.0)
    n = max(len(ids), 1)
    extra = {}
    if parents:  # each planted parent: how much of it its own latent leaves to others (suites.absorption)
        unit = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scores = [absorption(torch.cat(absorbed[p][0]), dec, directions[p], [int((unit @ directions[p]).argmax())],
                             torch.cat(absorbed[p][1])) for p in parents]
        extra = {"mean_absorption_fraction_score": float(sum(s[0] for s in scores) / len(scores)),
                 "mean_full_absorption_score": float(sum(s[1] for s in scores) / len(scores))}
    return {**extra, "mcc": round(float(matched.mean()), 9), "mmcs": round(float(cos.max(0).mean()), 9),
            "uniqueness": len(best.unique()) / d,
            "precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
            "accuracy": float(((tp + tn) / n).mean()), "dead_latents": int((~fired).sum()),
            "true_l0": float((coef != 0).sum()) / n, "sae_l0": sae_l0 / n, "rows": len(ids)}
