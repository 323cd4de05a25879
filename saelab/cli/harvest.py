"""Data: `saelab harvest` (a model's activations into stores) and `saelab synthetic` (a planted-feature store)."""

from __future__ import annotations

from saelab.cli.common import (
    add_arguments,
    add_command,
    add_distributed_arguments,
    add_run_flags,
    from_args,
    store_summary,
)
from saelab.config import HarvestConfig


def cmd_harvest(args) -> int:
    from saelab import distributed
    from saelab.harvest import harvest

    cfg = from_args(HarvestConfig, args)
    with distributed.session(cfg.device, args.dist_timeout, "the harvest"):
        stores = harvest(cfg, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    print(f"wrote {len(stores)} store{'s' if len(stores) != 1 else ''}:\n" + store_summary(stores))
    return 0


def cmd_synthetic(args) -> int:
    from saelab.synthetic import SyntheticConfig, write_synthetic

    cfg = from_args(SyntheticConfig, args)
    from saelab.store import resolve_stores

    path = write_synthetic(cfg, progress=not args.quiet)
    what = "a planted-feature pair of stores (input → target)" if cfg.d_out else "a planted-feature store"
    print(f"wrote {what}:\n" + store_summary({s.name: s for s in resolve_stores(path)}))
    return 0


def add_parser(sub) -> None:
    h = sub.add_parser("harvest", help="record hook activations of a model into HDF5 stores",
                       description="Record activations at TransformerLens hooks into activations/RUN/<hook>/.")
    add_arguments(h, HarvestConfig)
    h.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    add_run_flags(h, device=False)
    add_distributed_arguments(h)
    h.set_defaults(func=cmd_harvest)

    from saelab.synthetic import SyntheticConfig

    add_command(sub, "synthetic", SyntheticConfig, cmd_synthetic,
                help="write a planted-feature store (known ground truth)",
                description="Write sparse combinations of planted directions as an ordinary store.", device=False)
