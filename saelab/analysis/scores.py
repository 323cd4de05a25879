"""Many SAEs' evaluations side by side: each SAE folder's ``eval.json`` flattened into one row of numbers, and the
rows of SAEs that differ only by their training seed gathered into one setting (what the app's Evaluations page
plots against L0, with the spread over seeds as bars).

- ``flat_scores(ev)``: core's numbers under their names (``fvu``, ``ce_loss_recovered``, …) and each suite's
  top-level numbers as ``suite.name`` (``probing.sae_top_1_test_accuracy``, ``autointerp.detection``, …); counts
  (rows, tokens, …) are left out: they describe the run, not the SAE.
- A setting is everything that made the SAE but its seed: its ``cfg.json`` saelab block and its ``train.json``
  settings, less the seed and what does not change the weights (where it was written, the device, logging).
"""

from __future__ import annotations

import glob
import json
import pathlib
from dataclasses import dataclass, field

from saelab.errors import SaelabError
from saelab.layout import read_eval, read_sae_cfg, read_train_info
from saelab.targets import sae_folders

#: eval.json numbers that count what a run read, not how good the SAE is
COUNTS = {"rows", "steps", "tokens", "eval_tokens", "ce_contexts", "ce_contexts_asked", "epochs", "windows",
          "n_latents", "n_saes", "n_pairs", "threshold", "dead_latents"}
#: train.json settings that do not change the weights an SAE ends with (beyond the seed)
NOT_SETTING = {"seed", "out", "device", "kernel", "log", "log_every", "eval_every", "checkpoint_every", "buffer_rows",
               "activations", "hook"}


@dataclass
class ScoreRow:
    folder: pathlib.Path
    hook: str
    arch: str
    width: int
    k: int
    seed: int | None
    setting: str  # JSON of what made the SAE but its seed
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def l0(self) -> float | None:
        return self.scores.get("l0")


def flat_scores(ev: dict) -> dict[str, float]:
    """The numbers of one eval.json: core's by name, each suite's top-level ones as ``suite.name``."""
    out = {}

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for k, v in ev.items():
        if isinstance(v, dict):
            out.update({f"{k}.{n}": float(x) for n, x in v.items() if number(x) and n not in COUNTS})
        elif number(v) and k not in COUNTS:
            out[k] = float(v)
    return out


def expand(specs) -> list[pathlib.Path]:
    """SAE folders of ``specs`` (paths, globs allowed, or one comma-separated string): an SAE folder, each SAE of a
    group folder, and each SAE or group folder directly inside a folder of them (a sweep's runs/). A spec that
    matches nothing is a one-line error naming it."""
    if isinstance(specs, str):
        specs = [s for s in (p.strip() for p in specs.split(",")) if s]
    out: list[pathlib.Path] = []
    for spec in specs:
        paths = sorted(glob.glob(str(pathlib.Path(spec).expanduser()))) or []
        if not paths:
            raise SaelabError(f"{spec}: no such folder (pass SAE or group folders, or a glob such as runs/sweep/*)")
        for p in map(pathlib.Path, paths):
            try:
                out += sae_folders(p)
            except SaelabError:
                inner = [q for q in sorted(p.iterdir()) if q.is_dir()] if p.is_dir() else []
                found = []
                for q in inner:
                    try:
                        found += sae_folders(q)
                    except SaelabError:
                        continue
                if not found:
                    raise SaelabError(f"{p} is no SAE or group folder and holds none: pass the folders of SAEs") \
                        from None
                out += found
    seen, unique = set(), []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def score_rows(folders) -> list[ScoreRow]:
    """One row per SAE folder that has an eval.json (the others are left out: nothing to plot)."""
    rows = []
    for folder in map(pathlib.Path, folders):
        ev = read_eval(folder)
        if not ev:
            continue
        cfg = read_sae_cfg(folder)
        block = cfg.get("saelab") if isinstance(cfg.get("saelab"), dict) else {}
        info = read_train_info(folder, f"rerun saelab train --out {folder}")
        train = info.get("train", {})
        setting = {"sae": block, "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
                   "hook": cfg.get("hook_name"), "train": {k: v for k, v in train.items() if k not in NOT_SETTING},
                   "store": info.get("store_identity")}
        rows.append(ScoreRow(folder, str(cfg.get("hook_name") or ""), str(block.get("arch") or cfg.get("architecture")
                                                                           or ""),
                             int(cfg.get("d_sae") or 0), int(block.get("k") or 0),
                             train.get("seed") if isinstance(train.get("seed"), int) else None,
                             json.dumps(setting, sort_keys=True), flat_scores(ev)))
    return rows


def settings(rows: list[ScoreRow]) -> list[list[ScoreRow]]:
    """The rows gathered by setting (SAEs that differ only by seed together), in the order their first row comes."""
    groups: dict[str, list[ScoreRow]] = {}
    for r in rows:
        groups.setdefault(r.setting, []).append(r)
    return list(groups.values())


def metrics(rows: list[ScoreRow]) -> list[str]:
    """Every score some row has, core's first, then each suite's, in the order they first appear."""
    names = list(dict.fromkeys(k for r in rows for k in r.scores))
    return [n for n in names if "." not in n] + [n for n in names if "." in n]
