"""`saelab eval`: reconstruction and, with --model, CE-loss recovered and KL."""

from __future__ import annotations

from saelab.cli.common import add_command, eval_line, from_args
from saelab.options import EvalOptions


def cmd_eval(args) -> int:
    from saelab.evaluate import evaluate
    from saelab.targets import sae_folders

    o = from_args(EvalOptions, args)
    folders = sae_folders(o.sae)  # a group folder: each of its SAEs, spliced into one loaded model
    model = None
    if o.model and len(folders) > 1:
        from saelab.device import pick_device
        from saelab.models import load_model

        model = load_model(o.model, str(pick_device(args.device)))
    for folder in folders:
        ev = evaluate(folder, o.activations, o.model, n_contexts=o.contexts, device=args.device,
                      progress=not args.quiet, model=model)
        print(f"{folder}: {eval_line(ev)}")
    return 0


def add_parser(sub) -> None:
    add_command(sub, "eval", EvalOptions, cmd_eval,
                help="FVU, L0, dead/dense latents; with --model, CE-loss recovered and KL",
                description="Reconstruction metrics of an SAE over its store's held-out rows; with --model, the SAE "
                            "spliced into the model for CE-loss recovered and KL. Writes eval.json into the SAE "
                            "folder (each SAE of a group folder).")
