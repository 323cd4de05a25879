"""The ``saelab`` command line: thin wrappers that parse, call the library, and report."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import warnings

from saelab import SaelabError, __version__
from saelab.config import HarvestConfig, add_arguments, from_args


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
    from saelab.harvest import harvest

    cfg = from_args(HarvestConfig, args)
    stores = harvest(cfg, resume=args.resume, progress=not args.quiet)
    print(f"wrote {len(stores)} store{'s' if len(stores) != 1 else ''}:\n" + _summary(stores))
    return 0


def cmd_demo(args) -> int:
    from saelab.harvest import RUN_FILE, harvest

    out = pathlib.Path(args.out)
    cfg = HarvestConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], out=str(out),
                        tokens=args.tokens)
    print(f"demo: harvesting {', '.join(cfg.hooks)} from the bundled tiny model on the bundled corpus → {out}")
    stores = harvest(cfg, resume=(out / RUN_FILE).exists(), progress=not args.quiet)
    print(f"wrote {len(stores)} stores:\n" + _summary(stores))
    print("next: the trainer and the browser (saelab train / saelab app) come with later releases")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelab", description="Sparse autoencoder workbench.")
    p.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("harvest", help="record hook activations of a model into HDF5 stores",
                       description="Record activations at TransformerLens hooks into activations/RUN/<hook>/.")
    add_arguments(h, HarvestConfig)
    h.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=cmd_harvest)

    d = sub.add_parser("demo", help="run the pipeline on the bundled tiny model and corpus")
    d.add_argument("--out", default="activations/demo", help="RUN folder (default: activations/demo)")
    d.add_argument("--tokens", type=int, default=None, help="tokens to harvest (default: the whole corpus)")
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
        return args.func(args)
    except SaelabError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
