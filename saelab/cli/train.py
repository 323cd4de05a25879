"""`saelab train`: SAEs on stores, one per hook of a RUN folder."""

from __future__ import annotations

from saelab.cli.common import add_arguments, add_distributed_arguments, add_run_flags, eval_line, from_args
from saelab.config import SAEConfig, TrainConfig
from saelab.layout import read_eval, read_mfr, read_sae_cfg


def cmd_train(args) -> int:
    from saelab import distributed
    from saelab.cli.common import check_sae_flags
    from saelab.train import train

    check_sae_flags(args)
    tcfg, scfg = from_args(TrainConfig, args), from_args(SAEConfig, args)
    with distributed.session(tcfg.device, args.dist_timeout, "training"):
        folders = train(tcfg, scfg, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    for hook, folder in folders.items():
        ev = read_eval(folder) or {}
        writes = (read_sae_cfg(folder).get("saelab") or {}).get("hook_name_out")  # a transcoder's output hook
        what = f"{hook} → {writes}" if writes else hook
        print(f"{folder}: {what}: {eval_line(ev)} ({ev.get('epochs', 0):.2f} epochs of the store)")
    if tcfg.mfr:
        meta = read_mfr(tcfg.out)
        pairs = ", ".join(f"{meta['members'][int(i)]}/{meta['members'][int(j)]} {v:.3f}"
                          for (i, j), v in ((k.split("/"), v) for k, v in meta["mmcs"].items()))
        print(f"{tcfg.out}: MFR group of {len(meta['members'])} (--mfr-coeff {meta['coeff']:g}); decoder MMCS {pairs}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train SAEs on an activation store (one per hook of a RUN folder), or "
                                     "transcoders on its pairs of stores",
                       description="Train sparse autoencoders on stored activations.")
    add_arguments(t, TrainConfig)
    add_arguments(t, SAEConfig)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    add_run_flags(t, device=False)
    add_distributed_arguments(t)
    t.set_defaults(func=cmd_train)
