"""The ``saelab`` command line: thin wrappers that parse, call the library, and report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import warnings

from saelab import SaelabError, __version__
from saelab.config import HarvestConfig, SAEConfig, TrainConfig, add_arguments, from_args


def _summary(stores: dict) -> str:
    from saelab.store import ActivationStore

    lines = []
    for hook, path in stores.items():
        s = ActivationStore(path, verify=False)
        size = sum((path / sh["file"]).stat().st_size for sh in s.shards)
        lines.append(f"  {path}: {s.n_rows('all'):,} rows × d_in {s.d_in} ({s.manifest['dtype']}), "
                     f"{len(s.shards)} shards ({len(s.manifest['holdout_shards'])} held out), {size / 2**20:.1f} MiB")
    return "\n".join(lines)


def cmd_harvest(args) -> int:
    from saelab import distributed
    from saelab.harvest import harvest

    cfg = from_args(HarvestConfig, args)
    with distributed.session(cfg.device, args.dist_timeout, "the harvest"):
        stores = harvest(cfg, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    print(f"wrote {len(stores)} store{'s' if len(stores) != 1 else ''}:\n" + _summary(stores))
    return 0


def _eval_line(ev: dict) -> str:
    parts = [f"FVU {ev['fvu']:.3f}", f"L0 {ev['l0']:.1f}", f"dead {100 * ev['dead_frac']:.1f}%",
             f"dense {100 * ev['dense_frac']:.1f}%"]
    if "ce_loss_recovered" in ev:
        parts += [f"CE clean {ev['ce_clean']:.3f} / SAE {ev['ce_sae']:.3f} / zero-ablated {ev['ce_zero_ablation']:.3f}",
                  f"CE-loss recovered {ev['ce_loss_recovered']:.3f}", f"KL {ev['kl']:.4f}"]
    return ", ".join(parts)


def cmd_train(args) -> int:
    from saelab import distributed
    from saelab.train import train

    tcfg, scfg = from_args(TrainConfig, args), from_args(SAEConfig, args)
    with distributed.session(tcfg.device, args.dist_timeout, "training"):
        folders = train(tcfg, scfg, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    for hook, folder in folders.items():
        ev = json.loads((folder / "eval.json").read_text())
        print(f"{folder}: {hook}: {_eval_line(ev)} ({ev.get('epochs', 0):.2f} epochs of the store)")
    return 0


def cmd_eval(args) -> int:
    from saelab.evaluate import evaluate

    ev = evaluate(args.sae, args.activations, args.model, n_contexts=args.contexts, device=args.device,
                  progress=not args.quiet)
    print(f"{args.sae}: {_eval_line(ev)}")
    return 0


def cmd_synthetic(args) -> int:
    from saelab.synthetic import SyntheticConfig, write_synthetic

    cfg = from_args(SyntheticConfig, args)
    path = write_synthetic(cfg, progress=not args.quiet)
    print(f"wrote a planted-feature store:\n" + _summary({"synthetic": path}))
    return 0


def cmd_demo(args) -> int:
    from saelab.demo import DEMO_HOOKS, DEMO_K, demo_root, ensure_group
    from saelab.evaluate import evaluate

    root = demo_root(args.dir)
    print(f"demo: harvesting {', '.join(DEMO_HOOKS)} from the bundled tiny model on the bundled corpus, then "
          f"training one TopK SAE (k={DEMO_K}) per hook → {root / 'activations/demo'}, {root / 'runs/demo'} "
          "(a finished demo is reused)")
    demo = ensure_group(root, tokens=args.tokens, train_tokens=args.train_tokens, progress=not args.quiet)
    print(f"wrote {len(demo.stores)} stores:\n" + _summary(demo.stores))
    for hook, folder in demo.saes.items():
        ev = evaluate(folder, str(demo.stores[hook]), "tiny", progress=not args.quiet)
        print(f"{folder}: {hook}: {_eval_line(ev)}")
    print(f"SAE group: {demo.group}")
    return 0


def _add_distributed_arguments(p) -> None:
    p.add_argument("--nproc", type=int, default=None,
                   help="run as N processes: execs `python -m torch.distributed.run --standalone "
                        "--nproc_per_node N -m saelab ...` (or launch with torchrun yourself)")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a collective may wait for the other ranks before the run stops "
                        "(default: $SAELAB_DIST_TIMEOUT, else 300)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelab", description="Sparse autoencoder workbench.")
    p.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("harvest", help="record hook activations of a model into HDF5 stores",
                       description="Record activations at TransformerLens hooks into activations/RUN/<hook>/.")
    add_arguments(h, HarvestConfig)
    h.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed_arguments(h)
    h.set_defaults(func=cmd_harvest)

    t = sub.add_parser("train", help="train SAEs on an activation store (one per hook of a RUN folder)",
                       description="Train sparse autoencoders on stored activations.")
    add_arguments(t, TrainConfig)
    add_arguments(t, SAEConfig)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="FVU, L0, dead/dense latents; with --model, CE-loss recovered and KL")
    e.add_argument("--sae", required=True, help="an SAE folder (saelab or SAELens)")
    e.add_argument("--activations", default=None, help="store or RUN folder (default: the one it was trained on)")
    e.add_argument("--model", default=None, help="splice the SAE into this model for CE metrics (e.g. tiny)")
    e.add_argument("--contexts", type=int, default=64, help="held-out contexts for the CE metrics (default: 64)")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    from saelab.synthetic import SyntheticConfig

    y = sub.add_parser("synthetic", help="write a planted-feature store (known ground truth)",
                       description="Write sparse combinations of planted directions as an ordinary store.")
    add_arguments(y, SyntheticConfig)
    y.add_argument("--quiet", action="store_true", help="no progress bar")
    y.set_defaults(func=cmd_synthetic)

    d = sub.add_parser("demo", help="run the pipeline on the bundled tiny model and corpus",
                       description="Harvest the tiny model, train one TopK SAE per residual hook (a group), "
                                   "evaluate them. Re-running reuses what is finished.")
    d.add_argument("--dir", default=None, help="where activations/demo and runs/demo go "
                                               "(default: $SAELAB_DEMO_DIR, else the current folder)")
    d.add_argument("--tokens", type=int, default=None, help="tokens to harvest (default: the whole corpus)")
    d.add_argument("--train-tokens", type=int, default=2_000_000, help="SAE training tokens per hook (default: 2M)")
    d.add_argument("--no-app", action="store_true", help="never open the browser (also implied by CI or no terminal)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if (getattr(args, "nproc", None) or 1) > 1 and not os.environ.get("WORLD_SIZE"):
            from saelab import distributed

            distributed.exec_torchrun(args.nproc, distributed.strip_nproc(sys.argv[1:] if argv is None else argv))
        return args.func(args)
    except SaelabError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
