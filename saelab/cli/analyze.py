"""`saelab analyze` (the feature database) and `saelab export` (its cards as one HTML file)."""

from __future__ import annotations

from saelab.cli.common import add_command, from_args
from saelab.options import AnalyzeOptions, ExportOptions


def cmd_analyze(args) -> int:
    import numpy as np

    from saelab.analysis.features.build import analyze
    from saelab.analysis.features.db import FeatureDB
    from saelab.targets import sae_folders

    o = from_args(AnalyzeOptions, args)
    for folder in sae_folders(o.sae):
        path = analyze(folder, o.activations, tokens=o.tokens, top=o.top, device=args.device, progress=not args.quiet)
        with FeatureDB(folder) as db:
            alive = db.density > 0
            med = float(np.median(db.density[alive])) if alive.any() else 0.0
            print(f"wrote {path}: {db.hook}, {db.n_rows:,} rows, {int(alive.sum()):,} of {db.d_sae:,} latents alive "
                  f"({100 * alive.mean():.1f}%), median density of the alive {med:.2e}")
    return 0


def cmd_export(args) -> int:
    from saelab.analysis.cards import export_html

    o = from_args(ExportOptions, args)
    out, n = export_html(o.sae, o.out, latents=o.latents, sample=o.sample, seed=o.seed, progress=not args.quiet,
                         max_cards=o.max_cards, force=o.force)
    size = out.stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    print(f"wrote {out}: {n} latent card{'s' * (n != 1)}, {shown} (open it in any browser)")
    return 0


def add_parser(sub) -> None:
    add_command(sub, "analyze", AnalyzeOptions, cmd_analyze,
                help="feature database: density, top/quantile examples, logit effects -> features.h5",
                description="One streaming pass over a store through an SAE; writes features.h5 into the SAE folder "
                            "(each SAE of a group folder).")

    add_command(sub, "export", ExportOptions, cmd_export,
                help="latent cards as one self-contained HTML file (no server needed)",
                description="Write the feature cards of chosen latents (default: a random sample of the alive ones) "
                            "from features.h5 into one HTML file that any browser opens offline.", device=False)
