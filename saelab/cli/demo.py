"""`saelab demo`: the whole pipeline on the bundled model."""

from __future__ import annotations

import os
import sys

from saelab.cli.common import add_command, eval_line, from_args, store_summary
from saelab.errors import SaelabError
from saelab.options import AppOptions, DemoOptions


def cmd_demo(args) -> int:
    from saelab.demo import DEMO_HOOKS, DEMO_K, demo_root, ensure_group
    from saelab.evaluate import evaluate
    from saelab.layout import GROUP_FILE

    o = from_args(DemoOptions, args)
    for flag, v in (("--tokens", o.tokens), ("--train-tokens", o.train_tokens)):
        if v is not None and v < 1:  # checked before the harvest, each naming its own flag
            raise SaelabError(f"{flag} must be positive (got {v})")
    root = demo_root(o.dir)
    finished = (root / "runs" / "demo" / GROUP_FILE).is_file()
    if finished:
        print(f"demo: reusing the finished demo in {root} ({root / 'activations/demo'}, {root / 'runs/demo'}; "
              "delete them to build it again)")
    else:
        print(f"demo: harvesting {', '.join(DEMO_HOOKS)} from the bundled tiny model on the bundled corpus, then "
              f"training one TopK SAE (k={DEMO_K}) per hook → {root / 'activations/demo'}, {root / 'runs/demo'} "
              "(an interrupted demo resumes)")
    demo = ensure_group(root, tokens=o.tokens, train_tokens=o.train_tokens, progress=not args.quiet)
    print(f"{'the' if finished else 'wrote'} {len(demo.stores)} stores:\n" + store_summary(demo.stores))
    for hook, folder in demo.saes.items():
        ev = evaluate(folder, str(demo.stores[hook]), "tiny", progress=not args.quiet)
        print(f"{folder}: {eval_line(ev)}")
    print(f"SAE group: {demo.group}")
    return _demo_open_app(args, demo.group)


def _demo_open_app(args, group) -> int:
    """Open the app on the demo group, unless --no-app, $CI, or no terminal (then say how)."""
    cmd = f"saelab app --sae {group}"
    if args.no_app or os.environ.get("CI") or not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(f"open the app with: {cmd}")
        return 0
    print(f"opening the app: {cmd}")
    args.sae, args.port, args.host = str(group), AppOptions.port, AppOptions.host
    from saelab.cli.app import cmd_app

    return cmd_app(args)


def add_parser(sub) -> None:
    add_command(sub, "demo", DemoOptions, cmd_demo,
                help="run the pipeline on the bundled tiny model and corpus",
                description="Harvest the tiny model, train one TopK SAE per residual hook (a group), evaluate them. "
                            "Re-running reuses what is finished.", device=False)
