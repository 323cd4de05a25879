"""`saelab eval`: reconstruction and, with --model, CE-loss recovered and KL."""

from __future__ import annotations


from saelab.cli.common import (add_run_flags, eval_line)


def cmd_eval(args) -> int:
    from saelab.targets import sae_folders
    from saelab.evaluate import evaluate

    folders = sae_folders(args.sae)  # a group folder: each of its SAEs, spliced into one loaded model
    model = None
    if args.model and len(folders) > 1:
        from saelab.models import load_model
        from saelab.device import pick_device

        model = load_model(args.model, str(pick_device(args.device)))
    for folder in folders:
        ev = evaluate(folder, args.activations, args.model, n_contexts=args.contexts, device=args.device,
                      progress=not args.quiet, model=model)
        print(f"{folder}: {eval_line(ev)}")
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="FVU, L0, dead/dense latents; with --model, CE-loss recovered and KL",
                       description="Reconstruction metrics of an SAE over its store's held-out rows; with --model, the "
                                   "SAE spliced into the model for CE-loss recovered and KL. Writes eval.json into the "
                                   "SAE folder (each SAE of a group folder).")
    e.add_argument("--sae", required=True, help="an SAE folder (saelab or SAELens) or a group folder (group.json)")
    e.add_argument("--activations", default=None, help="store or RUN folder (default: the one it was trained on)")
    e.add_argument("--model", default=None, help="splice the SAE into this model for CE metrics (e.g. tiny)")
    e.add_argument("--contexts", type=int, default=64, help="held-out contexts for the CE metrics (default: 64)")
    add_run_flags(e)
    e.set_defaults(func=cmd_eval)
