"""The ``saelab`` command line: parse, call the library, report.

One module per command group, each with its parser (``add_parser``) and its handlers (``cmd_*``). Nothing
below this package knows a flag's spelling beyond the config fields that declare it, or prints a line for
a user: the handlers do. A ``SaelabError`` is printed on one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from saelab import __version__
from saelab.cli import analyze, app, circuit, compare, demo, evaluate, fetch, harvest, heads, steer, train
from saelab.errors import SaelabError

#: the command groups in the order ``saelab --help`` lists them: the pipeline first, then the tools
GROUPS = (harvest, train, evaluate, analyze, compare, steer, circuit, heads, fetch, demo, app)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelab", description="Sparse autoencoder workbench.")
    p.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", None) is not None and args.nproc < 1:
            raise SaelabError(f"--nproc {args.nproc}: pass 1 or more processes (or leave it out for one)")
        if (getattr(args, "nproc", None) or 1) > 1 and not os.environ.get("WORLD_SIZE"):
            from saelab import distributed

            distributed.exec_torchrun(args.nproc, distributed.strip_nproc(sys.argv[1:] if argv is None else argv))
        return args.func(args)
    except SaelabError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted" + (" (resume with --resume)" if hasattr(args, "resume") else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
