"""`saelab analyze` (the feature database) and `saelab export` (its cards as one HTML file)."""

from __future__ import annotations


from saelab.cli.common import (add_run_flags)


def cmd_analyze(args) -> int:
    import numpy as np

    from saelab.analysis.features.build import analyze
    from saelab.analysis.features.db import FeatureDB
    from saelab.targets import sae_folders

    for folder in sae_folders(args.sae):
        path = analyze(folder, args.activations, tokens=args.tokens, top=args.top, device=args.device,
                       progress=not args.quiet)
        with FeatureDB(folder) as db:
            alive = db.density > 0
            med = float(np.median(db.density[alive])) if alive.any() else 0.0
            print(f"wrote {path}: {db.hook}, {db.n_rows:,} rows, {int(alive.sum()):,} of {db.d_sae:,} latents alive "
                  f"({100 * alive.mean():.1f}%), median density of the alive {med:.2e}")
    return 0


def cmd_export(args) -> int:
    from saelab.analysis.cards import export_html

    out, n = export_html(args.sae, args.out, latents=args.latents, sample=args.sample, seed=args.seed,
                         progress=not args.quiet, max_cards=args.max_cards)
    size = out.stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    print(f"wrote {out}: {n} latent card{'s' * (n != 1)}, {shown} (open it in any browser)")
    return 0


def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="feature database: density, top/quantile examples, logit effects -> features.h5",
                       description="One streaming pass over a store through an SAE; writes features.h5 into the SAE "
                                   "folder (each SAE of a group folder).")
    a.add_argument("--sae", required=True, help="an SAE folder (saelab or SAELens) or a group folder (group.json)")
    a.add_argument("--activations", default=None,
                   help="store or RUN folder (default: the store each SAE was trained on, from its train.json)")
    a.add_argument("--tokens", type=int, default=None, help="analyse only the first N rows (default: the whole store)")
    a.add_argument("--top", type=int, default=20, help="top-activating examples kept per latent (default: 20)")
    add_run_flags(a)
    a.set_defaults(func=cmd_analyze)

    x = sub.add_parser("export", help="latent cards as one self-contained HTML file (no server needed)",
                       description="Write the feature cards of chosen latents (default: a random sample of the alive "
                                   "ones) from features.h5 into one HTML file that any browser opens offline.")
    x.add_argument("--sae", required=True, help="an analysed SAE folder, or a group folder (every SAE in it)")
    x.add_argument("--out", required=True, help="the HTML file to write, e.g. cards.html")
    x.add_argument("--latents", default=None, help="latent ids and ranges, e.g. 3,17,100-120 (default: --sample)")
    x.add_argument("--sample", type=int, default=50,
                   help="without --latents: this many random latents that fired, per SAE (default: 50)")
    x.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    x.add_argument("--max-cards", type=int, default=None,
                   help="refuse to write more cards than this in all (each is tens of KiB of HTML) (default: 2000)")
    add_run_flags(x, device=False)
    x.set_defaults(func=cmd_export)
