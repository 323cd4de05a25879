"""``timed_rankings``: both head rankings on the same examples, alternated, with median-of-repeats times.

``saelab heads --compare-ablation --repeats N`` reports these times (the comparison of the two methods'
run times is that command's output), and ``benchmarks/bench_heads.py`` measures with them."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from saelab.analysis.heads.identify import ablation_ranking, identify_heads
from saelab.analysis.heads.ranking import HeadRanking
from saelab.errors import SaelabError
from saelab.options import MAX_THREADS, HeadsOptions


def _median_run(runs: list[HeadRanking]) -> HeadRanking:
    """The run with the median wall time (runs are deterministic for a seed: same rankings), marked with
    every run's time and how many there were."""
    mid = sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]
    mid.info.update(repeats=len(runs), seconds_runs=[r.seconds for r in runs])
    return mid


def timed_rankings(model, task, n_examples: int = HeadsOptions.n, repeats: int = HeadsOptions.repeats, *,
                   ablation_positions: str = HeadsOptions.ablation_positions,
                   threads: int | None = HeadsOptions.threads, progress: bool = False,
                   **identify_kw) -> tuple[HeadRanking, HeadRanking]:
    """Identification and the ablation sweep on the same examples, alternated ``repeats`` times (a busy
    CPU slows both alike); returns each method's median-time run. Warm the model up before calling.

    ``threads``: torch threads for both methods alike (None: as set). The default 1: forwards of 8-16
    short prompts gain little from more threads, and on a CPU shared with other work several threads
    wait on each other."""
    if repeats < 1:
        raise SaelabError(f"--repeats {repeats}: pass 1 or more")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise SaelabError(f"--threads {threads}: pass 1 to {MAX_THREADS}")
    before = torch.get_num_threads()
    ident, abl = [], []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for _ in tqdm(range(repeats), desc="identification / ablation sweep", disable=not progress, leave=False):
            ident.append(identify_heads(model, task, n_examples, **identify_kw))
            abl.append(ablation_ranking(model, task, n_examples, positions=ablation_positions))
    finally:
        torch.set_num_threads(before)
    first = ident[0].heads()
    assert all(r.heads() == first for r in ident), "head identification is deterministic for a seed"
    ident, abl = _median_run(ident), _median_run(abl)
    ident.info["threads"] = abl.info["threads"] = threads or before
    return ident, abl
