"""What a command or the app is pointed at: an SAE folder, a group folder, a hub SAE, and the store an SAE reads.

Every ``--sae`` (and the app's target) is resolved here once:

- ``resolve_target``: an SAE folder or a group folder → ``Target`` (folder, group, {hook: SAE folder}, model);
- ``sae_folders``: the SAE folders a command iterates over (each SAE of a group);
- ``pick_sae``: one SAE, loaded, from a folder, a group with ``--hook``, or ``hf://ORG/REPO/SUBFOLDER``;
- ``load_sae``: ``SAE.load`` for folders and hub specs alike;
- ``store_for_sae``: the store an SAE is evaluated or analysed on (``--activations``, else its train.json).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from saelab.errors import SaelabError
from saelab.layout import (
    MANIFEST,
    TRAIN_FILE,
    check_local_sae,
    hub_spec,
    is_sae_folder,
    read_group,
    read_sae_cfg,
    read_train_info,
    sae_identity,
)

#: the environment variable the app reads its target from when it is not given --sae
APP_ENV_VAR = "SAELAB_APP_SAE"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a command opens: a group folder (``group`` set) or one SAE folder; ``saes`` {hook: folder}."""

    path: pathlib.Path
    group: pathlib.Path | None
    saes: dict
    model: str

    @property
    def circuits_dir(self) -> pathlib.Path:
        return (self.group or self.path.parent) / "circuits"


def resolve_target(path) -> Target:
    """An SAE folder (cfg.json + sae_weights.safetensors) or a group folder (group.json), else a
    SaelabError naming the fix."""
    if path is None or str(path).strip() == "":
        raise SaelabError(f"no SAE given: start the app with `saelab app --sae runs/NAME_OR_GROUP` "
                          f"(or set {APP_ENV_VAR})")
    check_local_sae(path)  # the app writes labels next to the SAE: a hub spec must be fetched first
    p = pathlib.Path(path).expanduser().resolve()
    group = read_group(p)
    if group is not None:
        model, saes = group
        saes = {h: f for h, f in saes.items() if is_sae_folder(f)}
        if not saes:
            raise SaelabError(f"group {p} lists no finished SAE folder: finish training it (saelab train --resume)")
        first = next(iter(saes.values()))
        return Target(p, p, saes, model or sae_identity(read_sae_cfg(first), first)["model"])
    if is_sae_folder(p):
        c = sae_identity(read_sae_cfg(p), p)
        return Target(p, None, {c["hook"]: p}, c["model"])
    if not p.exists():
        raise SaelabError(f"--sae {p}: no such folder: pass an SAE folder or a group folder (runs/NAME)")
    raise SaelabError(f"--sae {p} is neither an SAE folder (cfg.json + sae_weights.safetensors) nor a group "
                      "folder (group.json): pass a folder written by saelab train")


def sae_folders(path) -> list[pathlib.Path]:
    """The SAE folders of ``--sae``: a group folder's SAEs (group.json), else the folder itself."""
    group = read_group(path)
    if group is not None:
        return list(group[1].values())
    read_sae_cfg(path)
    return [pathlib.Path(path)]


def local_group(path) -> dict | None:
    """{hook: SAE folder} of a local group folder holding several SAEs, else None (one SAE, a hub spec)."""
    if hub_spec(path):
        return None
    target = resolve_target(path)
    return target.saes if target.group is not None and len(target.saes) > 1 else None


def load_sae(path, device="cpu"):
    """An SAE from a folder (saelab or SAELens) or from the hub (``hf://ORG/REPO/SUBFOLDER``, through its cache)."""
    spec = hub_spec(path)
    if spec:
        from saelab.hub import load_hub_sae

        return load_hub_sae(spec, device)
    from saelab.sae import SAE

    return SAE.load(path, device)


def pick_sae(path, hook: str | None, flag: str = "--hook"):
    """(the SAE's folder or hub spec, the SAE loaded on the CPU, the model it names) of a command's ``--sae``: an
    SAE folder, a group folder (with ``hook``, given as ``flag``, when it has several SAEs), or
    ``hf://ORG/REPO/SUBFOLDER`` (read from the hub or its cache: for commands that write nothing next to the SAE,
    so it needs no ``saelab fetch`` first). Errors are one line naming ``flag``."""
    spec = hub_spec(path)
    if spec:
        if hook is not None:
            raise SaelabError(f"{flag} picks an SAE of a group folder, and {spec} is one SAE: drop {flag}")
        loaded = load_sae(spec, device="cpu")
        return spec, loaded, loaded.cfg.model_name
    target = resolve_target(path)
    if hook is not None:
        if hook not in target.saes:
            raise SaelabError(f"{flag} {hook} is not in {target.path}: it has {', '.join(target.saes)}")
        folder = target.saes[hook]
    elif len(target.saes) > 1:
        raise SaelabError(f"{target.path} is a group of {len(target.saes)} SAEs: pass {flag}, one of "
                          f"{', '.join(target.saes)}")
    else:
        folder = next(iter(target.saes.values()))
    return folder, load_sae(folder, device="cpu"), target.model


def store_for_sae(sae_dir: str | os.PathLike, sae, activations: str | os.PathLike | None = None,
                  required: bool = True):
    """The store an SAE is evaluated or analysed on: ``activations`` (a store folder, or a RUN
    folder whose store of the SAE's hook is taken), else the store its train.json names. Without
    either: a one-line error, or None when not ``required``. A store of another hook or width, or
    a RUN folder of several stores for an SAE that names no hook, is refused."""
    from saelab.store import ActivationStore, resolve_stores

    sae_dir = pathlib.Path(sae_dir)
    hook = sae.cfg.hook_name or None
    if activations is None:
        activations = read_train_info(sae_dir, "pass --activations STORE_OR_RUN").get("store")
        if not isinstance(activations, str):
            if not required:
                return None
            model = getattr(sae.cfg, "model_name", "") or ""
            hint = (f" (harvest one with: saelab harvest --model {model} --hook {hook} --out activations/NAME)"
                    if model and hook else "")
            raise SaelabError(f"{sae_dir} has no {TRAIN_FILE} naming the store it was trained on: "
                              f"pass --activations STORE_OR_RUN{hint}")
        if not pathlib.Path(activations).exists():
            raise SaelabError(f"the store {activations} this SAE was trained on is gone: pass --activations STORE_OR_RUN")
    p = pathlib.Path(activations)
    # a store folder is taken as given (a hook or width mismatch is reported below); a RUN folder by hook
    stores = resolve_stores(p, None if (p / MANIFEST).exists() else hook)
    if len(stores) > 1:
        raise SaelabError(f"{p} holds {len(stores)} stores and the SAE names no hook: pass one store folder")
    store = ActivationStore(stores[0])
    if store.d_in != sae.d_in or (hook and store.hook != hook):
        raise SaelabError(f"store {store.path} holds {store.hook} (d_in {store.d_in}) but the SAE reads "
                          f"{hook or '?'} (d_in {sae.d_in}): pass --activations with a store of the SAE's hook")
    return store


def target_store_for(sae, store):
    """A transcoder's target store: the store of its output hook beside its input store (the two come from one
    harvest run), checked row-aligned with it; None for an SAE. Missing or of another width: a one-line error."""
    from saelab.store import ActivationStore
    from saelab.store.pairs import check_aligned

    out = sae.cfg.hook_name_out
    if not out:
        return None
    folder = pathlib.Path(store.path).parent / out
    if not (folder / MANIFEST).exists():
        raise SaelabError(f"this transcoder reconstructs {out}, but {store.path.parent} holds no store of it: pass "
                          "--activations with the RUN folder its pair of stores was harvested into")
    check_aligned(store.path, folder)
    target = ActivationStore(folder)
    if target.d_in != sae.cfg.output_dim:
        raise SaelabError(f"store {folder} has width {target.d_in} but the transcoder writes {sae.cfg.output_dim}: "
                          "pass --activations with the run it was trained on")
    return target


def layer_stores_for(sae, store) -> tuple[list, list]:
    """A cross-layer transcoder's (input stores, target stores), one per layer, beside ``store`` (its first input:
    every store of its pairs comes from one harvest run), each checked row-aligned with ``store``."""
    from saelab.store import ActivationStore
    from saelab.store.pairs import check_aligned

    run = pathlib.Path(store.path).parent
    inputs, targets = [], []
    for pair in sae.cfg.clt_pairs:
        a, b = pair.split(":", 1)
        for hook, side in ((a, inputs), (b, targets)):
            if not (run / hook / MANIFEST).exists():
                raise SaelabError(f"this cross-layer transcoder reads the pair {pair}, but {run} holds no store of "
                                  f"{hook}: pass --activations with the RUN folder it was trained on")
            check_aligned(store.path, run / hook)
            side.append(ActivationStore(run / hook))
    return inputs, targets


def target_from_argv_or_env(argv=None) -> str | None:
    """``--sae PATH`` from a script's arguments (``streamlit run Home.py -- --sae PATH``), else ``$SAELAB_APP_SAE``."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--sae" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--sae="):
            return a.split("=", 1)[1]
    return os.environ.get(APP_ENV_VAR)
