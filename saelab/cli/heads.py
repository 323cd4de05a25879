"""`saelab heads`: attention heads ranked by discrete SAE codes — the flags, the run, the printed report and
the ``--out`` JSON file."""

from __future__ import annotations

import pathlib

from saelab.cli.common import add_command, from_args
from saelab.errors import SaelabError
from saelab.options import MAX_THREADS, HeadsOptions


def _task_files(task: str) -> list[pathlib.Path]:
    """The task file a --task names (a built-in task name reads none)."""
    p = pathlib.Path(task).expanduser()
    return [p] if p.suffix == ".jsonl" or p.is_file() else []


def _fmt_heads(ranking, top: int, fmt: str) -> str:
    return ", ".join(f"L{l}H{h} ({fmt.format(s)})" for l, h, s in ranking[:top])


def report(ident, abl=None, top: int = 3, task_name: str = "") -> list[str]:
    """The lines ``saelab heads`` prints."""
    from saelab.analysis.heads import D_SAE, compare

    top = min(top, len(ident))
    lines = [f"head identification on '{task_name}' ({ident.n_examples} positive + {ident.n_examples} negative "
             f"examples, {len(ident)} heads, codes at position '{ident.info['position']}'): {ident.seconds:.3f} s "
             f"(forward {ident.info['forward_s']:.3f} s, SAEs {ident.info['train_s']:.3f} s)",
             "  top heads by codes unique to positives: " + _fmt_heads(ident, top, "{:.0f}")]
    d_sae = ident.info.get("d_sae", D_SAE)
    if ident.n_examples > d_sae:
        lines.append(f"  note: {ident.n_examples} examples a side is more than a head's {d_sae + 1} possible codes, so "
                     "codes recur on both sides and the counts lose meaning; the method is meant for 5-10 examples "
                     "(--n 8)")
    if abl is None:
        return lines
    cmp = compare(ident, abl, top)
    where = "every position" if abl.info["positions"] == "all" else "the last position"
    lh = cmp["ablation_top_head"]
    lines += [f"ablation sweep ({abl.info['mode']}-ablate one head's hook_z at {where}: 1 baseline + {len(abl)} "
              f"forwards on {abl.n_examples} clean prompts): {abl.seconds:.3f} s",
              "  top heads by logit-diff drop: " + _fmt_heads(abl, top, "{:.3f}"),
              (f"  precision@{top} {cmp['precision']:.2f}, recall@{top} {cmp['recall']:.2f} (important = drop >= "
               f"{cmp['truth_frac']:.0%} of the largest: " + ", ".join(f"L{l}H{h}" for l, h in cmp["important_heads"])
               + ")") if cmp["important_heads"] else
              "  precision/recall: n/a (no head's ablation lowers the logit difference: does the model do this task?)",
              f"  the head whose ablation hurts most, L{lh[0]}H{lh[1]}, is #{cmp['ablation_top_head_rank']} of "
              f"{len(ident)} by codes" + (f" (tied with {cmp['ablation_top_head_ties']} other heads)"
                                          if cmp["ablation_top_head_ties"] else ""),
              f"  time: identification {ident.seconds:.3f} s ({ident.seconds / len(ident) * 1000:.1f} ms per head), "
              f"ablation sweep {abl.seconds:.3f} s ({abl.info['per_head_s'] * 1000:.1f} ms per head); "
              f"ratio {cmp['time_ratio']:.3f} (identification's forward pass alone: {cmp['forward_ratio']:.3f})"
              + (f"; medians of {ident.info['repeats']} alternated runs" if ident.info.get("repeats", 1) > 1 else "")
              + (f", {ident.info['threads']} torch thread(s)" if "threads" in ident.info else "")]
    return lines


def run_heads(task: str, model: str = HeadsOptions.model, n: int = HeadsOptions.n, top: int = HeadsOptions.top,
              compare_ablation: bool = False, ablation_positions: str = HeadsOptions.ablation_positions,
              out: str | None = None, seed: int = HeadsOptions.seed, position: str = HeadsOptions.position,
              device: str = "auto", progress: bool = True, repeats: int = HeadsOptions.repeats,
              threads: int | None = HeadsOptions.threads, force: bool = False) -> tuple[dict, list[str]]:
    """What ``saelab heads`` does: (result dict, report lines); writes ``out`` (JSON, atomically) if given.
    With ``compare_ablation`` both methods run ``repeats`` times, alternated; the times are their medians."""
    import torch

    from saelab.analysis.heads import compare, identify_heads, timed_rankings
    from saelab.analysis.tasks import make_task
    from saelab.device import device_of
    from saelab.models import load_model
    from saelab.outputs import check_report, write_report, wrote

    if n < 1:
        raise SaelabError(f"--n {n}: head identification needs at least one example; pass --n 5 or more")
    if top < 1:
        raise SaelabError(f"--top {top}: pass a positive number of heads")
    if repeats < 1:
        raise SaelabError(f"--repeats {repeats}: pass 1 or more")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise SaelabError(f"--threads {threads}: pass 1 to {MAX_THREADS}, or 0 for torch's default")
    if out:  # an --out that is a folder or cannot be written is found before the work, not when writing
        out, replaced = check_report(out, "heads", example="heads.json", inputs=_task_files(task), force=force)
    m = load_model(model, device)
    t = make_task(task, m, n=n, seed=seed)
    with torch.no_grad():  # warm-up: the first forward of a process pays one-off costs neither method should
        m(t.clean[:1].to(device_of(m)))
    abl = None
    if compare_ablation:
        ident, abl = timed_rankings(m, t, n, repeats, ablation_positions=ablation_positions, threads=threads,
                                    progress=progress, position=position, seed=seed)
    else:
        before = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            ident = identify_heads(m, t, n, position=position, seed=seed, progress=progress)
        finally:
            torch.set_num_threads(before)
    res = {"task": t.name, "model": model, "identify": ident.to_dict()}
    if abl is not None:
        res.update(ablation=abl.to_dict(), compare=compare(ident, abl, min(top, len(ident))))
    lines = report(ident, abl, top, t.name)
    if out:
        lines.append(wrote(write_report(out, res, "heads", indent=2), replaced))
    return res, lines


def cmd_heads(args) -> int:
    o = from_args(HeadsOptions, args)
    _, lines = run_heads(o.task, model=o.model, n=o.n, top=o.top, compare_ablation=o.compare_ablation,
                         ablation_positions=o.ablation_positions, out=o.out, seed=o.seed, position=o.position,
                         device=args.device, progress=not args.quiet, repeats=o.repeats, threads=o.threads or None,
                         force=o.force)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
    add_command(sub, "heads", HeadsOptions, cmd_heads,
                help="rank attention heads by discrete SAE codes unique to a task's positive examples",
                description="Discrete-code head identification (O'Neill & Bui 2024): one small SAE per head on its "
                            "hook_z output over n clean (positive) and n corrupted (negative) prompts; heads ranked "
                            "by the codes seen only on positives. --compare-ablation also runs the per-head ablation "
                            "sweep and compares rankings and run times.")
