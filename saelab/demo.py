"""The demo store and SAE group: built once on first use, reused afterwards.

``ensure_group()`` harvests the bundled tiny model's residual stream after every block on the
bundled corpus (``<root>/activations/demo/<hook>/``) and trains one TopK SAE per hook into a
group (``<root>/runs/demo/<hook>/`` + ``group.json``). Notebooks, tests and ``saelab demo`` all
call it, so a fresh clone needs no hand steps; a finished group is returned at once, an
interrupted one resumes.

``root``: the argument, else ``$SAELAB_DEMO_DIR``, else the current directory (``saelab demo``
and ``make demo`` run from the repository root, so the demo lands in ``activations/demo`` and
``runs/demo`` there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

DEMO_HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
DEMO_K = 16
DEMO_EXPANSION = 16
DEMO_TRAIN_TOKENS = 2_000_000


@dataclasses.dataclass(frozen=True)
class DemoGroup:
    """Where the demo lives: ``run`` (the RUN folder with one store per hook), ``group`` (the SAE
    group folder), and ``saes`` {hook: SAE folder}, ``stores`` {hook: store folder}."""

    root: pathlib.Path
    run: pathlib.Path
    group: pathlib.Path
    saes: dict
    stores: dict


def demo_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    return pathlib.Path(root or os.environ.get("SAELAB_DEMO_DIR") or ".").expanduser().resolve()


def ensure_group(root: str | os.PathLike | None = None, *, tokens: int | None = None,
                 train_tokens: int = DEMO_TRAIN_TOKENS, progress: bool = True, model=None,
                 analyze: bool = True, name: str = "demo", hooks: tuple[str, ...] = DEMO_HOOKS) -> DemoGroup:
    """Build (or reuse) the demo store and SAE group; returns their folders.

    ``tokens``: rows to harvest (default: the whole bundled train split); ``train_tokens``: per
    SAE. A group already finished is reused as it is, whatever these say. ``analyze``: also write
    each SAE's ``features.h5`` (``saelab analyze``) where it is missing. ``name`` and ``hooks``
    build another group the same way (``activations/<name>/``, ``runs/<name>/``), e.g. SAEs on
    attention and MLP outputs for circuits; the defaults are the demo group.
    """
    demo = _ensure_trained(root, tokens=tokens, train_tokens=train_tokens, progress=progress, model=model,
                           name=name, hooks=tuple(hooks))
    if analyze:
        from saelab import SaelabError
        from saelab.analysis.features import FeatureDB, analyze as analyze_sae

        for hook, folder in demo.saes.items():
            try:
                FeatureDB(folder).close()  # present and written for this SAE
            except SaelabError:
                analyze_sae(folder, demo.stores[hook], model=model, progress=progress)
    return demo


def _ensure_trained(root, *, tokens, train_tokens, progress, model, name="demo", hooks=DEMO_HOOKS) -> DemoGroup:
    from saelab.config import HarvestConfig, SAEConfig, TrainConfig
    from saelab.harvest import RUN_FILE, harvest
    from saelab.store import atomic_write_text
    from saelab.train import GROUP_FILE, TRAIN_FILE, train

    base = demo_root(root)
    run, group = base / "activations" / name, base / "runs" / name
    saes = {h: group / h for h in hooks}
    stores = {h: run / h for h in hooks}
    if (group / GROUP_FILE).exists() and all(_done(saes[h] / TRAIN_FILE) for h in hooks):
        return DemoGroup(base, run, group, saes, stores)
    # resume continues an interrupted harvest and returns the stores at once when it had finished
    stores = harvest(HarvestConfig(hooks=list(hooks), out=str(run), tokens=tokens),
                     resume=(run / RUN_FILE).exists(), progress=progress, model=model)
    scfg = SAEConfig(arch="topk", k=DEMO_K, expansion=DEMO_EXPANSION)
    for h in hooks:  # one at a time, so an interruption resumes at the SAE it stopped in
        tcfg = TrainConfig(activations=str(run), hook=h, out=str(saes[h]), tokens=train_tokens, batch_size=4096)
        train(tcfg, scfg, resume=(saes[h] / TRAIN_FILE).exists(), progress=progress)
    model_name = json.loads((stores[hooks[0]] / "manifest.json").read_text()).get("model", "tiny")
    atomic_write_text(group / GROUP_FILE, json.dumps({"model": model_name, "hooks": {h: h for h in hooks}},
                                                     indent=2) + "\n")
    return DemoGroup(base, run, group, saes, dict(stores))


def _done(path: pathlib.Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("done"))
    except (OSError, ValueError):
        return False
