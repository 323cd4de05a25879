"""`saelab heads`: attention heads ranked by discrete SAE codes."""

from __future__ import annotations


from saelab.cli.common import (add_run_flags)


def cmd_heads(args) -> int:
    from saelab.analysis.heads import run_heads

    _, lines = run_heads(args.task, model=args.model, n=args.n, top=args.top, compare_ablation=args.compare_ablation,
                         ablation_positions=args.ablation_positions, out=args.out, seed=args.seed,
                         position=args.position, device=args.device, progress=not args.quiet, repeats=args.repeats,
                         threads=args.threads or None)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
    hd = sub.add_parser("heads", help="rank attention heads by discrete SAE codes unique to a task's positive examples",
                        description="Discrete-code head identification (O'Neill & Bui 2024): one small SAE per head "
                                    "on its hook_z output over n clean (positive) and n corrupted (negative) prompts; "
                                    "heads ranked by the codes seen only on positives. --compare-ablation also runs "
                                    "the per-head ablation sweep and compares rankings and run times.")
    hd.add_argument("--task", required=True, help="induction, ioi, names, or a .jsonl file of "
                                                  "{clean, corrupted, answer, wrong} lines")
    hd.add_argument("--model", default="tiny", help="tiny (bundled), a local Hugging Face folder or a hub name")
    hd.add_argument("--n", type=int, default=8, help="positive examples (as many negatives) (default: 8)")
    hd.add_argument("--top", type=int, default=3, help="heads to print and to score precision/recall at (default: 3)")
    hd.add_argument("--position", choices=["last", "mean"], default="last",
                    help="which hook_z the codes read: the last position (default) or the mean over positions")
    hd.add_argument("--compare-ablation", action="store_true",
                    help="also mean-ablate each head and report precision/recall@top and both run times")
    hd.add_argument("--ablation-positions", choices=["all", "last"], default="all",
                    help="ablate each head at every position (default) or only at the last one")
    hd.add_argument("--repeats", type=int, default=5,
                    help="with --compare-ablation: run both methods this many times, alternated, and report the "
                         "median times (default: 5)")
    hd.add_argument("--threads", type=int, default=1,
                    help="torch threads (with --compare-ablation: for both methods alike); 0 keeps torch's default "
                         "(default: 1, faster for these small forwards on a shared CPU)")
    hd.add_argument("--seed", type=int, default=0, help="task and SAE seed (default: 0)")
    hd.add_argument("--out", default=None, help="write the rankings, timings and comparison to this JSON file "
                                                "(an existing file is replaced, atomically, and the output says so)")
    add_run_flags(hd)
    hd.set_defaults(func=cmd_heads)
