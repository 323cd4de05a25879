"""The two head rankings of a task — by discrete SAE codes (``identify_heads``) and by ablating each head
(``ablation_ranking``) — and ``compare``, the first's precision/recall against the second."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.analysis.heads.activations import HOOK, head_activations
from saelab.analysis.heads.codes import discretise, unique_positive_codes
from saelab.analysis.heads.ranking import HeadRanking, rank_heads
from saelab.analysis.heads.saes import D_SAE, L1, LR, STEPS, train_head_saes
from saelab.analysis.tasks import as_task, logit_diff
from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.options import HeadsOptions


def _slice_task(task, n: int | None, model):
    """The task's first ``n`` examples; a task name or .jsonl path (str or Path) is built with
    ``make_task(task, model, n)`` first, as ``saelab heads`` does."""
    if n is not None and n < 1:
        raise SaelabError(f"n_examples={n}: head identification needs at least one example; pass 5 or more")
    task = as_task(task, model, n=64 if n is None else n)
    if n is None:
        return task
    return task.subset(range(min(n, len(task))))


def _check_task(task):
    if task.clean.ndim != 2 or len(task.clean) == 0:
        raise SaelabError(f"task '{task.name}' has no examples: give it at least one clean/corrupted pair")
    if task.clean.shape != task.corrupted.shape:
        raise SaelabError(f"task '{task.name}': clean {tuple(task.clean.shape)} and corrupted "
                          f"{tuple(task.corrupted.shape)} prompts differ in shape; they must tokenize to equal lengths")


def identify_heads(model, task, n_examples: int = HeadsOptions.n, *, d_sae: int = D_SAE, l1: float = L1,
                   steps: int = STEPS, lr: float = LR, position: str = HeadsOptions.position,
                   seed: int = HeadsOptions.seed, progress: bool = False) -> HeadRanking:
    """Rank every attention head by the SAE codes unique to the task's positive examples.

    ``task``: a ``saelab.analysis.tasks.Task`` (its first ``n_examples`` clean prompts are the
    positives, the matching corrupted prompts the negatives). Returns a HeadRanking whose score
    is the number of codes unique to positives (``info["fraction"]`` the normalised variant)."""
    task = _slice_task(task, n_examples, model)
    _check_task(task)
    cfg = model.cfg
    n = len(task.clean)
    bar = tqdm(total=3, desc="heads: forward, SAEs, codes", disable=not progress, leave=False)
    t0 = time.perf_counter()
    x = head_activations(model, torch.cat([task.clean, task.corrupted]), position)  # [2n, G, d_head]
    t1 = time.perf_counter()
    bar.update()
    x = x.transpose(0, 1).contiguous()  # [G, 2n, d_head] (head_activations' buffer: no copy)
    sae = train_head_saes(x, d_sae=d_sae, l1=l1, steps=steps, lr=lr, seed=seed)
    t2 = time.perf_counter()
    bar.update()
    with torch.no_grad():
        codes = discretise(sae.encode(x))
    positive = torch.arange(2 * n) < n
    counts, fracs = unique_positive_codes(codes, positive)
    t3 = time.perf_counter()
    bar.update()
    bar.close()
    shape = (cfg.n_layers, cfg.n_heads)
    scores, frac = counts.reshape(shape), fracs.reshape(shape)
    info = {"forward_s": t1 - t0, "train_s": t2 - t1, "score_s": t3 - t2, "position": position, "d_sae": d_sae,
            "l1": l1, "steps": steps, "lr": lr, "seed": seed, "fraction": frac.tolist(),
            "codes": codes.view(*shape, 2 * n).tolist()}
    return HeadRanking(rank_heads(scores, frac), method="codes", seconds=t3 - t0, scores=scores, n_examples=n,
                       info=info)


@torch.no_grad()
def ablation_ranking(model, task, n_examples: int = HeadsOptions.n, *, mode: str = "mean",
                     positions: str = HeadsOptions.ablation_positions,
                     progress: bool = False) -> HeadRanking:
    """Rank heads by how much ablating each one alone lowers the mean logit difference on the clean prompts.

    ``mode="mean"`` replaces the head's ``hook_z`` by its mean over these clean prompts (per position);
    ``"zero"`` by zeros. One forward for the baseline (which also gives the means) + one per head."""
    if mode not in ("mean", "zero"):
        raise SaelabError(f"ablation mode '{mode}' is not one of mean, zero")
    if positions not in ("all", "last"):
        raise SaelabError(f"ablation positions '{positions}' is not one of all, last")
    sl = slice(None) if positions == "all" else slice(-1, None)
    task = _slice_task(task, n_examples, model)
    _check_task(task)
    cfg = model.cfg
    dev = device_of(model)
    clean = task.clean.to(dev)
    t0 = time.perf_counter()
    hooks = [HOOK.format(layer=l) for l in range(cfg.n_layers)]
    logits, cache = model.run_with_cache(clean, names_filter=lambda name: name in hooks)
    base = float(logit_diff(logits, task).mean())
    means = {h: cache[h].mean(0, keepdim=True) for h in hooks}
    del cache
    drops = np.zeros((cfg.n_layers, cfg.n_heads))
    per_head_s = []
    bar = tqdm(total=cfg.n_layers * cfg.n_heads, desc="ablating heads", disable=not progress, leave=False)
    for layer in range(cfg.n_layers):
        hook = hooks[layer]
        for head in range(cfg.n_heads):
            def ablate(z, hook, head=head, layer_hook=hook):
                z = z.clone()
                z[:, sl, head] = means[layer_hook][:, sl, head] if mode == "mean" else 0.0
                return z

            th = time.perf_counter()
            out = model.run_with_hooks(clean, fwd_hooks=[(hook, ablate)])
            drops[layer, head] = base - float(logit_diff(out, task).mean())
            per_head_s.append(time.perf_counter() - th)
            bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    info = {"mode": mode, "positions": positions, "clean_logit_diff": base, "per_head_s": float(np.median(per_head_s))}
    return HeadRanking(rank_heads(drops), method="ablation", seconds=seconds, scores=drops, n_examples=len(clean),
                       info=info)


def compare(identified: HeadRanking, ablation: HeadRanking, top: int = HeadsOptions.top,
            truth_frac: float = 0.25) -> dict:
    """Precision / recall of the identification's top-``top`` heads against the ablation's important heads.

    Important heads: those whose ablation lowers the logit difference by at least ``truth_frac`` of the
    largest drop. Also: where the most important head lands in the identification ranking, and the
    two wall-clock times and their ratio."""
    if top < 1:
        raise SaelabError(f"--top {top}: pass a positive number of heads")
    best = float(ablation.scores.max())
    truth = {(l, h) for l, h, s in ablation if best > 0 and s >= truth_frac * best}
    pred = set(identified.heads(top))
    hit = len(pred & truth)
    l0, h0, _ = ablation[0]
    return {"top": top, "truth_frac": truth_frac, "important_heads": sorted(truth), "predicted": identified.heads(top),
            "precision": hit / len(pred), "recall": hit / len(truth) if truth else None,
            "ablation_top_head": (l0, h0), "ablation_top_head_rank": identified.rank_of(l0, h0),
            "ablation_top_head_ties": identified.tied_with(l0, h0),
            "identify_s": identified.seconds, "ablation_s": ablation.seconds,
            "time_ratio": identified.seconds / ablation.seconds,
            "forward_ratio": identified.info.get("forward_s", float("nan")) / ablation.seconds}
