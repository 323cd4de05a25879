"""The Streamlit app (``saelab app --sae runs/NAME_OR_GROUP``): Home.py + pages/ (Features, Steering,
Circuits), thin over ``saelab.analysis``.

It lives inside the package (not in a top-level ``app/``) so that ``saelab app`` finds it from the
installed package alone — with ``pip install -e .`` and with a regular install alike.
``resolve_target`` (no Streamlit import) is shared by the CLI's validation and the app.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

from saelab import SaelabError
from saelab.config import CFG_FILE, WEIGHTS_FILE, check_local_sae, read_group, read_sae_cfg

APP_DIR = pathlib.Path(__file__).resolve().parent
HOME = APP_DIR / "Home.py"
ENV_VAR = "SAELAB_APP_SAE"


@dataclasses.dataclass(frozen=True)
class Target:
    """What the app opens: a group folder (``group`` set) or one SAE folder; ``saes`` {hook: folder}."""

    path: pathlib.Path
    group: pathlib.Path | None
    saes: dict
    model: str

    @property
    def circuits_dir(self) -> pathlib.Path:
        return (self.group or self.path.parent) / "circuits"


def _is_sae(p: pathlib.Path) -> bool:
    return (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def _sae_cfg(p: pathlib.Path) -> dict:
    raw = read_sae_cfg(p)
    meta = raw.get("metadata") or {}
    return {"hook": raw.get("hook_name") or meta.get("hook_name") or p.name,
            "model": raw.get("model_name") or meta.get("model_name") or "tiny"}


def resolve_target(path) -> Target:
    """An SAE folder (cfg.json + sae_weights.safetensors) or a group folder (group.json), else a
    SaelabError naming the fix."""
    if path is None or str(path).strip() == "":
        raise SaelabError(f"no SAE given: start the app with `saelab app --sae runs/NAME_OR_GROUP` "
                          f"(or set {ENV_VAR})")
    check_local_sae(path)  # the app writes labels next to the SAE: a hub spec must be fetched first
    p = pathlib.Path(path).expanduser().resolve()
    group = read_group(p)
    if group is not None:
        model, saes = group
        saes = {h: f for h, f in saes.items() if _is_sae(f)}
        if not saes:
            raise SaelabError(f"group {p} lists no finished SAE folder: finish training it (saelab train --resume)")
        return Target(p, p, saes, model or _sae_cfg(next(iter(saes.values())))["model"])
    if _is_sae(p):
        c = _sae_cfg(p)
        return Target(p, None, {c["hook"]: p}, c["model"])
    if not p.exists():
        raise SaelabError(f"--sae {p}: no such folder: pass an SAE folder or a group folder (runs/NAME)")
    raise SaelabError(f"--sae {p} is neither an SAE folder (cfg.json + sae_weights.safetensors) nor a group "
                      "folder (group.json): pass a folder written by saelab train")


def target_from_argv_or_env(argv=None) -> str | None:
    """``--sae PATH`` from the script's arguments (``streamlit run Home.py -- --sae PATH``), else
    ``$SAELAB_APP_SAE``."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--sae" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--sae="):
            return a.split("=", 1)[1]
    return os.environ.get(ENV_VAR)
