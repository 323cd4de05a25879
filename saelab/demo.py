"""The demo store and SAE group: built once on first use, reused afterwards.

``ensure_group()`` harvests the bundled tiny model's residual stream after every block on the
bundled corpus (``<root>/activations/demo/<hook>/``) and trains one TopK SAE per hook into a
group (``<root>/runs/demo/<hook>/`` + ``group.json``). Notebooks, tests and ``saelab demo`` all
call it, so a fresh clone needs no hand steps; a finished group is returned at once, an
interrupted one resumes.

``root``: the argument, else ``$SAELAB_DEMO_DIR``, else the saelab checkout the current folder is in
(so a notebook opened in ``notebooks/`` uses the demo ``make demo`` built at the repository root), else
the current folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from saelab.options import DemoOptions

DEMO_HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
DEMO_K = 16
DEMO_EXPANSION = 16
DEMO_TRAIN_TOKENS = DemoOptions.train_tokens
# the wide group (``ensure_wide_group``): 8x the demo's width on the same stores, for circuits whose nodes are
# token-specific latents (random-token induction; docs: guide/circuits)
WIDE_EXPANSION = 128
WIDE_TRAIN_TOKENS = 500_000
WIDE_LR = 1e-3
# the demo CLT (``ensure_clt``): both MLPs of the bundled model, k 16 per layer; notebook 05 traces graphs over it
CLT_K = 16
CLT_EXPANSION = 8
CLT_HARVEST_TOKENS = 131_072
CLT_TRAIN_TOKENS = 400_000


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
    """The folder that holds ``activations/<name>/`` and ``runs/<name>/``: ``root``, else
    ``$SAELAB_DEMO_DIR``, else the nearest folder at or above the current one that is a saelab
    checkout (its ``pyproject.toml`` names the project ``saelab``, or it already holds
    ``runs/demo/group.json``), else the current folder. So a notebook that Jupyter runs in
    ``notebooks/`` reuses the checkout's demo instead of building a second one beside itself."""
    chosen = root or os.environ.get("SAELAB_DEMO_DIR")
    if chosen:
        return pathlib.Path(chosen).expanduser().resolve()
    here = pathlib.Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "runs" / "demo" / "group.json").is_file() or _names_saelab(folder / "pyproject.toml"):
            return folder
    return here


def _names_saelab(pyproject: pathlib.Path) -> bool:
    """Whether ``pyproject`` exists and its ``[project]`` table is named ``saelab``."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        import tomllib
    except ImportError:  # Python 3.10: the [project] table's name line
        import re

        table = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        return bool(table and re.search(r"""^\s*name\s*=\s*["']saelab["']""", table.group(1), re.M))
    try:
        return tomllib.loads(text).get("project", {}).get("name") == "saelab"
    except tomllib.TOMLDecodeError:
        return False


def ensure_group(root: str | os.PathLike | None = None, *, tokens: int | None = None,
                 train_tokens: int = DEMO_TRAIN_TOKENS, progress: bool = True, model=None,
                 analyze: bool = True, name: str = "demo", hooks: tuple[str, ...] = DEMO_HOOKS,
                 expansion: int = DEMO_EXPANSION, lr: float | None = None,
                 activations: str | None = None) -> DemoGroup:
    """Build (or reuse) the demo store and SAE group; returns their folders.

    ``tokens``: rows to harvest (default: the whole bundled train split); ``train_tokens``: per
    SAE. A group already finished is reused as it is, whatever these say. ``analyze``: also write
    each SAE's ``features.h5`` (``saelab analyze``) where it is missing. ``name`` and ``hooks``
    build another group the same way (``activations/<name>/``, ``runs/<name>/``), e.g. SAEs on
    attention and MLP outputs for circuits; the defaults are the demo group. ``expansion`` (d_sae / d_in)
    and ``lr`` (None: the trainer's default) set its SAEs; ``activations``: the name of the activation run
    to train on (default: ``name``), e.g. "demo" to reuse the demo's stores instead of harvesting again.
    """
    demo = _ensure_trained(root, tokens=tokens, train_tokens=train_tokens, progress=progress, model=model,
                           name=name, hooks=tuple(hooks), expansion=expansion, lr=lr, activations=activations)
    if analyze:
        from saelab.analysis.features.build import analyze as analyze_sae
        from saelab.analysis.features.db import FeatureDB
        from saelab.errors import SaelabError

        for hook, folder in demo.saes.items():
            try:
                FeatureDB(folder).close()  # present and written for this SAE
            except SaelabError:
                analyze_sae(folder, demo.stores[hook], model=model, progress=progress)
    return demo


def ensure_wide_group(root: str | os.PathLike | None = None, *, progress: bool = True, model=None) -> DemoGroup:
    """The "wide" group: TopK SAEs 8x wider than the demo's (k 16, d_sae 16384 on d_model 128; lr 1e-3,
    500k tokens each) at the demo's hooks, trained on the demo's stores (built first if missing) into
    ``<root>/runs/wide``. Notebook 02 and tests/test_circuits.py use it for the random-token induction circuit.
    Not analysed (no features.h5)."""
    return ensure_group(root, progress=progress, model=model, name="wide", expansion=WIDE_EXPANSION,
                        train_tokens=WIDE_TRAIN_TOKENS, lr=WIDE_LR, activations="demo", analyze=False)


def _ensure_trained(root, *, tokens, train_tokens, progress, model, name="demo", hooks=DEMO_HOOKS,
                    expansion=DEMO_EXPANSION, lr=None, activations=None) -> DemoGroup:
    from saelab.config import HarvestConfig, SAEConfig, TrainConfig
    from saelab.fs import atomic_write_text
    from saelab.harvest import _complete, harvest
    from saelab.layout import GROUP_FILE, RUN_FILE, TRAIN_FILE
    from saelab.train import train

    base = demo_root(root)
    run, group = base / "activations" / (activations or name), base / "runs" / name
    saes = {h: group / h for h in hooks}
    stores = {h: run / h for h in hooks}
    if (group / GROUP_FILE).exists() and all(_done(saes[h] / TRAIN_FILE) for h in hooks):
        return DemoGroup(base, run, group, saes, stores)
    if activations and activations != name and all(_complete(stores[h]) for h in hooks):
        pass  # another group's finished stores (a copied demo folder too, whose harvest.json names its old path)
    else:  # resume continues an interrupted harvest and returns the stores at once when it had finished
        stores = harvest(HarvestConfig(hooks=list(hooks), out=str(run), tokens=tokens),
                         resume=(run / RUN_FILE).exists(), progress=progress, model=model)
    scfg = SAEConfig(arch="topk", k=DEMO_K, expansion=expansion)
    for h in hooks:  # one at a time, so an interruption resumes at the SAE it stopped in
        tcfg = TrainConfig(activations=str(run), hook=h, out=str(saes[h]), tokens=train_tokens, batch_size=4096,
                           lr=lr)
        train(tcfg, scfg, resume=(saes[h] / TRAIN_FILE).exists(), progress=progress)
    model_name = json.loads((stores[hooks[0]] / "manifest.json").read_text()).get("model", "tiny")
    atomic_write_text(group / GROUP_FILE, json.dumps({"model": model_name, "hooks": {h: h for h in hooks}},
                                                     indent=2) + "\n")
    return DemoGroup(base, run, group, saes, dict(stores))


def ensure_clt(root: str | os.PathLike | None = None, *, progress: bool = True, model=None) -> pathlib.Path:
    """The demo cross-layer transcoder: the bundled model's MLP inputs and outputs harvested in pairs
    (``<root>/activations/demo-mlp``, as ``saelab harvest --pairs mlp``) and one CLT over both layers trained on them
    (``<root>/runs/demo-clt``, as ``saelab train --arch clt``; k 16 per layer, 8x d_model latents per layer, 400k
    tokens). Built once, reused afterwards, resumed where interrupted; returns the CLT's folder."""
    from saelab.config import HarvestConfig, SAEConfig, TrainConfig
    from saelab.harvest import harvest
    from saelab.layout import RUN_FILE, TRAIN_FILE
    from saelab.train import train

    base = demo_root(root)
    run, out = base / "activations" / "demo-mlp", base / "runs" / "demo-clt"
    if _done(out / TRAIN_FILE):
        return out
    harvest(HarvestConfig(pairs="mlp", out=str(run), tokens=CLT_HARVEST_TOKENS), resume=(run / RUN_FILE).exists(),
            progress=progress, model=model)
    train(TrainConfig(activations=str(run), out=str(out), tokens=CLT_TRAIN_TOKENS, batch_size=4096),
          SAEConfig(arch="clt", k=CLT_K, expansion=CLT_EXPANSION), resume=(out / TRAIN_FILE).exists(),
          progress=progress)
    return out


def _done(path: pathlib.Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("done"))
    except (OSError, ValueError):
        return False
