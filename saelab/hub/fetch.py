"""Fetch a pretrained SAE from the Hugging Face hub into an ordinary SAE folder.

``fetch_sae("ORG/REPO/SUBFOLDER", out)`` downloads the subfolder's ``cfg.json`` and
``sae_weights.safetensors`` (the SAELens layout that SAELens releases and ``saelab train`` both
write) through ``huggingface_hub`` (its cache, token and offline mode apply), checks that saelab
loads them (``SAE.load``: a supported architecture, shapes that match the config), and only then
moves them into ``out`` together with ``source.json`` (repo, subfolder, the revision asked for and
the commit it resolved to). SAEs released in other layouts — Gemma Scope's ``params.npz``, EleutherAI
sparsify's ``cfg.json`` + ``sae.safetensors`` — are converted (``saelab.formats``) and written as saelab
writes an SAE (``source.json`` records the layout they came in). A local folder in any of these layouts
is taken too (``source.json`` then records its path). ``out`` is then an SAE folder like any other:
``saelab analyze --sae out --activations STORE`` (a store of the SAE's model and hook), ``saelab eval``,
the app, steering.

Several SAEs of one model, one per hook (``fetch_group``, ``saelab fetch SPEC SPEC … --out GROUP``),
make a group folder (``GROUP/<hook>/`` + ``group.json``) as ``saelab train`` writes one, for
``saelab circuit``, the app and ``analyze``.

A failure leaves nothing behind: the files are gathered in hidden folders, fsynced, checked and
only then renamed into place. One fetch at a time writes an ``out`` (``fs.run_lock``, held from the
download to the rename; a second gets a one-line error naming the first), and it removes the staging
folders a killed one left. Fetching into a folder that already holds the same SAE (or group)
from the same repo, subfolder and revision is a no-op, so a notebook may call it every time.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil

from saelab.errors import SaelabError
from saelab.fs import (atomic_write_text, entries, fsync_dir, fsync_file, no_empty_folder_left,
                       replace_held_folder, run_lock)
from saelab.hooks import hook_layer
from saelab.hub.download import _read_hub_sae, _read_local_sae, default_out, local_folder, parse_spec
from saelab.layout import CFG_FILE, GROUP_FILE, SOURCE_FILE, group_json, hub_spec, read_group, read_source
from saelab.models import same_model
from saelab.sae import SAE


def _commit_of(path: pathlib.Path) -> str | None:
    """The commit a cached file belongs to (.../snapshots/<commit>/...), or None."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _quiet_bars(progress: bool) -> None:
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _target(model: str | None, hook: str | None) -> dict | None:
    """The --model / --hook given to fetch ({"model", "hook"}, None where not given), or None for neither."""
    if hook is not None and "hook" not in hook:
        raise SaelabError(f"--hook {hook!r} is not a TransformerLens hook name: pass e.g. blocks.3.hook_resid_post")
    if model is None and hook is None:
        return None
    return {"model": model, "hook": hook}


def _retarget(cfg_path: pathlib.Path, target: dict) -> None:
    """Set the model and/or hook an SAE's cfg.json records (its flat fields, SAELens's metadata block and
    saelab's own block), rewriting the file atomically."""

    raw = json.loads(cfg_path.read_text())
    for block in (raw, raw.get("metadata"), raw.get("saelab")):
        if isinstance(block, dict):
            if target["model"] is not None:
                block["model_name"] = target["model"]
            if target["hook"] is not None:
                block["hook_name"] = target["hook"]
    if target["hook"] is not None and "hook_layer" in raw:
        raw["hook_layer"] = hook_layer(target["hook"])
    atomic_write_text(cfg_path, json.dumps(raw, indent=2) + "\n")


def _link_blob(src: pathlib.Path, dst: pathlib.Path) -> bool:
    """Hard-link the cached weights file ``src`` (a symlink to its blob) as ``dst``: the fetched folder then
    costs no second copy of a file that can be gigabytes, and no time to copy it. Only ``.safetensors`` from the
    hub cache are linked: its blobs are named by content and never rewritten in place, and saelab replaces its
    files rather than rewriting them (temp, rename), so neither side can change the other. ``cfg.json`` is
    copied (small, and an editor may rewrite it in place); a local folder's files are copied (their owner may
    re-save them in place). False (copy instead) when the link cannot be made: another filesystem, or links
    not allowed there."""
    if dst.suffix != ".safetensors":
        return False
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        return False
    return True


def _stage(spec: str, revision: str | None, cache_dir, tmp: pathlib.Path, target: dict | None = None):
    """Download ``spec`` into the new folder ``tmp`` (fsynced, source.json written) and load it; returns the SAE.
    ``target``: the model and/or hook to record instead of the ones the SAE came with (``_target``).
    On any failure ``tmp`` is removed and the error, one line, names ``spec`` (not the hidden folder)."""

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    local = local_folder(spec)
    if local:
        if revision:
            raise SaelabError(f"--revision applies to hub SAEs, and {spec} is a local folder: drop --revision")
        layout, files, converted = _read_local_sae(local, target)
        source = {"path": str(local), "format": layout, "fetched": now}
    else:
        repo, sub = parse_spec(spec)
        try:
            layout, files, converted = _read_hub_sae(spec, revision, cache_dir, target)
        except SaelabError as err:
            hint = _local_hint(spec)
            if hint:
                raise SaelabError(f"{err}{hint}") from None
            raise
        source = {"repo_id": repo, "subfolder": sub, "revision": revision,
                  "commit": _commit_of(next(iter(files.values()))), "format": layout, "fetched": now}
    if target:
        source["target"] = target
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if converted is None:
            for f, src in files.items():
                if not local and _link_blob(src, tmp / f):
                    source["weights"] = "hard-linked to the hub cache"
                else:
                    shutil.copyfile(src, tmp / f)  # the cache's symlinks resolve to their blobs
                fsync_file(tmp / f)
            if target:  # a converted SAE took the target when it was built
                _retarget(tmp / CFG_FILE, target)
        else:
            converted.save(tmp)  # cfg.json + sae_weights.safetensors, as saelab train writes them
        try:
            sae = SAE.load(tmp)
        except SaelabError as err:
            why = str(err).replace(f"{tmp}: ", "").replace(f"{tmp}/", "").replace(str(tmp), "the fetched folder")
            raise SaelabError(f"{spec}: {why}") from None
        sae.check_finite(spec)  # NaN weights (a diverged run): no folder of them, as eval and analyze refuse them
        atomic_write_text(tmp / SOURCE_FILE, json.dumps(source, indent=2) + "\n")
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sae


def _local_hint(spec: str) -> str:
    """For a relative spec whose leading folders exist here (a mistyped local path, read as ORG/REPO/SUBFOLDER):
    a hint naming the nearest existing folder, else ""."""
    p = pathlib.Path(spec).expanduser()
    if p.is_absolute() or hub_spec(spec):
        return ""
    parent = p.parent
    while parent != pathlib.Path(".") and not parent.is_dir():
        parent = parent.parent
    if parent == pathlib.Path("."):
        return ""
    inside = sorted(c.name for c in parent.iterdir() if c.is_dir() and not c.name.startswith("."))
    return (f"; or, if {spec} was meant as a local folder: there is no such folder, {parent} holds "
            + (", ".join(inside[:5]) + (", …" if len(inside) > 5 else "") if inside else "no folders"))


def _check_revision(specs, revision: str | None) -> None:
    """--revision names a hub commit: with a local folder it is a one-line error, before anything else."""
    for spec in specs if revision else ():
        if local_folder(spec):
            raise SaelabError(f"--revision applies to hub SAEs, and {spec} is a local folder: drop --revision")


def _key(spec: str) -> tuple:
    """What names ``spec``'s SAE: (repo id, subfolder), or (the local folder,)."""
    local = local_folder(spec)
    return (str(local),) if local else parse_spec(spec)


def _holds(folder: pathlib.Path, spec: str, revision: str | None, target: dict | None = None) -> bool:
    """Whether ``folder`` holds ``spec`` fetched before (at the same revision, with the same --model / --hook)."""
    had = read_source(folder)
    if not had or had.get("target") != target:
        return False
    if "path" in had:
        return (had["path"],) == _key(spec)
    return (had.get("repo_id"), had.get("subfolder"), had.get("revision")) == (*_key(spec), revision)


def fetch_sae(spec: str, out=None, revision: str | None = None, cache_dir=None, progress: bool = True,
              model: str | None = None, hook: str | None = None):
    """Download the hub SAE ``spec`` (ORG/REPO/SUBFOLDER, or a local folder) into the folder ``out`` (default
    ``default_out(spec)``); returns (out, loaded SAE, fetched: False when ``out`` already held it). ``model`` /
    ``hook``: record these instead of what the SAE came with (one that records none, or a wrong one).
    See the module docstring."""

    _key(spec)  # a malformed hub spec: its one-line error before anything else
    _check_revision([spec], revision)
    target = _target(model, hook)
    out = pathlib.Path(out).expanduser() if out is not None else default_out(spec)
    if out.exists() and not out.is_dir():
        raise SaelabError(f"--out {out} is a file: pass a folder path")
    if _fetched_before(out, [spec], revision, target):  # a folder of something else is refused untouched
        return out, SAE.load(out), False
    _quiet_bars(progress)
    with no_empty_folder_left(out):
        out.mkdir(parents=True, exist_ok=True)
        with run_lock(out):  # one fetch at a time into --out, from the download to the rename
            if _fetched_before(out, [spec], revision, target):  # another run fetched it meanwhile
                return out, SAE.load(out), False
            tmp = out.parent / f".{out.name}{STAGING}{os.getpid()}"
            _remove_staging(out.parent, f".{out.name}{STAGING}")
            sae = _stage(spec, revision, cache_dir, tmp, target)
            try:
                replace_held_folder(tmp, out)  # all of the SAE appears at once
                fsync_dir(out.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return out, sae, True


#: the infix of the hidden folders a fetch stages its files in (beside --out, or inside a group's --out)
STAGING = ".fetching-"


def _remove_staging(folder: pathlib.Path, prefix: str) -> None:
    """Remove the staging folders (``prefix`` and a pid, or a pid-index) that runs killed before their rename left in
    ``folder``: the caller holds the run lock of the folder they were staged for, so no live run is writing them."""
    for child in folder.iterdir():
        pid = child.name[len(prefix):] if child.name.startswith(prefix) else ""
        if pid.replace("-", "").isdigit() and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)


def _fetched_before(out: pathlib.Path, specs: list[str], revision: str | None, target: dict | None) -> bool:
    """Whether ``out`` already holds these SAEs (one: an SAE folder, several: a group) fetched at this revision with
    this --model / --hook: True, or False for a new or empty folder (a killed run's lock or staging folders count as
    empty); a folder of anything else is a one-line error."""
    if not out.is_dir():
        return False
    held = [c for c in entries(out) if not c.name.startswith(STAGING)]
    if not held:
        return False
    if len(specs) == 1 and _holds(out, specs[0], revision, target):
        return True
    group = read_group(out) if len(specs) > 1 else None
    if group and len(group[1]) == len(specs) and all(
            any(_holds(f, s, revision, target) for f in group[1].values()) for s in specs):
        return True
    raise SaelabError(f"--out {out} already exists and holds something else: choose a new --out")


def fetch_group(specs: list[str], out, revision: str | None = None, cache_dir=None, progress: bool = True,
                model: str | None = None):
    """Download several hub SAEs of one model, one per hook, into the group folder ``out``
    (``out/<hook>/`` + ``group.json``, as ``saelab train`` writes a group: circuits, the app and analyze
    take it). All are downloaded and checked before any is moved into place; a failure leaves nothing.
    ``model``: record this model for every SAE instead of what they came with.
    Returns (out, {hook: SAE}, fetched: False when ``out`` already held this group)."""

    specs = list(specs)
    target = _target(model, None)
    if out is None:
        raise SaelabError("several SAEs make a group: pass --out GROUP_FOLDER")
    keys = [_key(s) for s in specs]
    _check_revision(specs, revision)
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise SaelabError(f"{specs[i]} is given twice: pass each SAE once")
    out = pathlib.Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SaelabError(f"--out {out} is a file: pass a folder path")

    def fetched():
        return out, {h: SAE.load(f) for h, f in read_group(out)[1].items()}, False

    if _fetched_before(out, specs, revision, target):
        return fetched()
    _quiet_bars(progress)
    with no_empty_folder_left(out):
        out.mkdir(parents=True, exist_ok=True)
        with run_lock(out):  # one fetch at a time into --out, from the downloads to group.json
            if _fetched_before(out, specs, revision, target):  # another run fetched it meanwhile
                return fetched()
            _remove_staging(out, STAGING)
            return _fetch_into_group(specs, out, revision, cache_dir, target)


def _fetch_into_group(specs: list[str], out: pathlib.Path, revision, cache_dir, target):
    """``fetch_group``'s work in the held, empty group folder ``out``: stage every SAE, check them together, move
    them into place, write group.json; a failure removes what it staged and placed."""
    staged: list[tuple[str, pathlib.Path, object]] = []
    placed: list[pathlib.Path] = []
    try:
        for i, spec in enumerate(specs):
            tmp = out / f"{STAGING}{os.getpid()}-{i}"
            staged.append((spec, tmp, _stage(spec, revision, cache_dir, tmp, target)))
        by_hook: dict[str, str] = {}
        for spec, _, sae in staged:
            hook = sae.cfg.hook_name
            if not hook:
                raise SaelabError(f"{spec} records no hook: a group holds one SAE per hook; fetch it alone")
            if hook in by_hook:
                raise SaelabError(f"{by_hook[hook]} and {spec} both read {hook}: a group holds one SAE per hook")
            by_hook[hook] = spec
        models = sorted({sae.cfg.model_name for _, _, sae in staged})
        if any(not same_model(models[0], m) for m in models[1:]):
            raise SaelabError(f"these SAEs come from different models ({', '.join(m or '?' for m in models)}): "
                              "a group is of one model; fetch them into separate groups")
        for _, tmp, sae in staged:
            os.replace(tmp, out / sae.cfg.hook_name)
            placed.append(out / sae.cfg.hook_name)
        atomic_write_text(out / GROUP_FILE, group_json(models[0], by_hook))
        fsync_dir(out)
    except BaseException:
        for folder in [tmp for _, tmp, _ in staged] + placed:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return out, {sae.cfg.hook_name: sae for _, _, sae in staged}, True
