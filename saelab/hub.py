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
only then renamed into place. Fetching into a folder that already holds the same SAE (or group)
from the same repo, subfolder and revision is a no-op, so a notebook may call it every time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import re
import shutil

from saelab import SaelabError
from saelab.config import CFG_FILE, HUB_PREFIX, SOURCE_FILE, WEIGHTS_FILE, hub_spec, read_json_object, read_source
from saelab.store import atomic_write_text, fsync_dir, fsync_file


def parse_spec(spec: str) -> tuple[str, str]:
    """``ORG/REPO[/SUBFOLDER…]`` (optionally ``hf://``-prefixed) → (repo id, subfolder or "")."""
    s = str(spec).strip().removeprefix(HUB_PREFIX)
    parts = [x for x in s.strip("/").split("/") if x]
    if len(parts) < 2:
        raise SaelabError(f"{spec!r} is not a hub SAE: pass ORG/REPO/SUBFOLDER (the folder holding {CFG_FILE} and "
                          f"{WEIGHTS_FILE}), e.g. jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre")
    return "/".join(parts[:2]), "/".join(parts[2:])


def default_out(spec: str) -> pathlib.Path:
    """runs/<repo name>/<subfolder> (runs/<repo name> when the SAE sits at the repo's root); runs/<folder name>
    for a local folder."""
    local = local_folder(spec)
    if local:
        return pathlib.Path("runs") / local.name
    repo, sub = parse_spec(spec)
    return pathlib.Path("runs") / repo.split("/")[1] / sub if sub else pathlib.Path("runs") / repo.split("/")[1]


def _errors():
    """huggingface_hub's exception classes (``errors`` since 0.23; ``utils`` before)."""
    try:
        from huggingface_hub import errors as e
    except ImportError:  # pragma: no cover - older huggingface_hub
        from huggingface_hub import utils as e
    return e


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, folder: str | None = None):
    """huggingface_hub's errors for ``repo`` (reading the SAE in ``folder``, "" for the root; None: listing the
    repo) as one-line SaelabErrors naming the fix."""
    e = _errors()
    where = f"{repo}" + (f"@{revision}" if revision else "")
    what = "its file list" if folder is None else f"the SAE in {folder or 'its root'}"
    try:
        yield
    except e.LocalEntryNotFoundError:
        cached = _folders_hint(repo, revision, "; cached: ", none="") if folder is not None else ""
        raise SaelabError(f"{where}: {what} is not in the local Hugging Face cache and the hub cannot be "
                          f"reached (offline, or HF_HUB_OFFLINE=1): connect and fetch again{cached}") from None
    except e.GatedRepoError:
        raise SaelabError(f"{where} is gated: accept its terms on huggingface.co and log in (`hf auth login`)") from None
    except e.RepositoryNotFoundError:
        raise SaelabError(f"hub repo {repo} not found (or private: log in with `hf auth login`)") from None
    except e.RevisionNotFoundError:
        raise SaelabError(f"{repo} has no revision {revision!r}: pass a branch, tag or commit it has") from None
    except e.EntryNotFoundError:
        from saelab.formats import LAYOUT_HELP

        raise SaelabError(f"{where} has no SAE in {folder or 'its root'} ({LAYOUT_HELP}): pass ORG/REPO/SUBFOLDER "
                          f"of a folder that holds one{_folders_hint(repo, revision)}") from None
    except e.HFValidationError as err:
        raise SaelabError(f"{repo!r} is not a hub repo id ({str(err).split(':')[0]}): pass ORG/REPO/SUBFOLDER") from None
    except e.HfHubHTTPError as err:
        raise SaelabError(f"{where}: the hub answered {str(err).splitlines()[0]}: retry later") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(repo: str, revision: str | None, cache_dir) -> tuple[list[str], bool]:
    """(the repo's file paths, whether they come from the hub). Offline (HF_HUB_OFFLINE), the files of its
    cached snapshot: only those downloaded before."""
    from huggingface_hub import constants, list_repo_files

    if not _offline():
        with _hub_errors(repo, revision):
            return list_repo_files(repo, revision=revision), True
    root = pathlib.Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    ref = revision or "main"
    commit = ref if re.fullmatch(r"[0-9a-f]{40}", ref) else None
    if commit is None and (root / "refs" / ref).is_file():
        commit = (root / "refs" / ref).read_text().strip()
    snap = root / "snapshots" / (commit or "-")
    if not snap.is_dir():
        raise SaelabError(f"{repo}{'@' + revision if revision else ''} is not in the local Hugging Face cache and "
                          "the hub cannot be reached (HF_HUB_OFFLINE=1): connect and list again")
    return _files_under(snap), False


def _files_under(root: pathlib.Path) -> list[str]:
    """The paths (relative to ``root``, sorted) of the files under the folder ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def sae_folders(files) -> list[str]:
    """The folders (repo-relative; "" for the root) among file paths that hold an SAE in a layout saelab reads
    (saelab.formats.LAYOUTS: cfg.json + the weights, or Gemma Scope's params.npz, or sparsify's)."""
    from saelab.formats import layout_of

    by_folder: dict[str, set[str]] = {}
    for f in files:
        folder, _, name = f.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    return sorted(d for d, names in by_folder.items() if layout_of(names))


def list_hub_saes(repo: str, revision: str | None = None, cache_dir=None) -> tuple[list[str], bool]:
    """(the SAE folders of hub repo ``repo`` — each an ORG/REPO/SUBFOLDER ``fetch`` takes —, whether the list
    is complete: from the hub, not the local cache). For a local folder: the SAE folders under it (complete)."""
    local = local_folder(repo)
    if local:
        return [str(local / d) if d else str(local) for d in sae_folders(_files_under(local))], True
    repo, sub = parse_spec(repo)
    files, online = _repo_files(repo, revision, cache_dir)
    if sub:
        files = [f for f in files if f.startswith(sub.rstrip("/") + "/")]
    return [f"{repo}/{d}" if d else repo for d in sae_folders(files)], online


def _folders_hint(repo: str, revision: str | None, lead: str = "; it has: ",
                  none: str = "; it holds no SAE folder saelab reads") -> str:
    """``lead`` + the repo's SAE folders (a, b, c), ``none`` when it has none, '' when they cannot be listed."""
    try:
        folders = [f.removeprefix(repo + "/") for f in list_hub_saes(repo, revision)[0]]
    except Exception:  # the hint is optional
        return ""
    if not folders:
        return none
    more = f" (+{len(folders) - 6} more)" if len(folders) > 6 else ""
    return f"{lead}{', '.join(folders[:6])}{more}"


def _probe(repo: str, filename: str, revision: str | None, cache_dir, misses: dict | None = None):
    """``filename``'s path in the hub cache (downloaded when not cached), or None when the repo has no such file
    (or, offline, when it is not cached; ``misses`` then keeps huggingface_hub's error under ``filename``).
    Other hub errors are one-line SaelabErrors."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo, revision, filename.rpartition("/")[0]):
        try:
            return pathlib.Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir))
        except _errors().EntryNotFoundError as err:  # LocalEntryNotFoundError (offline, not cached) is one too
            if misses is not None:
                misses[filename] = err
            return None


def _download_sae(spec: str, revision: str | None, cache_dir) -> tuple[str, dict[str, pathlib.Path]]:
    """(layout, {file name: its path in the hub cache}) of ``spec``'s SAE, downloading what is not cached: the
    SAELens layout (cfg.json + sae_weights.safetensors) first, then sparsify's (cfg.json + sae.safetensors),
    then Gemma Scope's (params.npz). None of them: the error of cfg.json's miss (or, when it is there, of the
    weights that are not)."""
    from saelab.formats import LAYOUTS

    repo, sub = parse_spec(spec)
    name = (lambda f: f"{sub}/{f}" if sub else f)
    found: dict[str, pathlib.Path | None] = {}
    misses: dict[str, Exception] = {}
    for layout, files in LAYOUTS.items():
        for f in files:
            if f not in found:
                found[f] = _probe(repo, name(f), revision, cache_dir, misses)
            if found[f] is None:
                break
        else:
            return layout, {f: found[f] for f in files}
    if found.get(CFG_FILE) is not None:
        raise SaelabError(f"{repo}/{sub} has {CFG_FILE} but no weights ({LAYOUTS['saelens'][1]} or "
                          f"{LAYOUTS['sparsify'][1]}){' in the local cache (offline)' if _offline() else ''}: "
                          "pass the folder of an SAE" + _folders_hint(repo, revision))
    with _hub_errors(repo, revision, sub):  # cfg.json's own miss: not cached (offline), or no such file
        raise misses[name(CFG_FILE)]


def _sparsify_run_cfg(repo: str, sub: str, revision: str | None, cache_dir) -> dict:
    """sparsify's run config.json one folder above the hookpoint folder ({} when it has none)."""
    from saelab.formats import SPARSIFY_RUN_CFG

    parent = sub.rstrip("/").rpartition("/")[0]
    return read_json_object(_probe(repo, f"{parent}/{SPARSIFY_RUN_CFG}" if parent else SPARSIFY_RUN_CFG, revision,
                                   cache_dir)) or {}


def local_folder(spec) -> pathlib.Path | None:
    """``spec`` as an existing local folder (absolute), else None (an ``hf://`` spec never is one): ``fetch`` takes
    a local SAE folder too, converting Gemma Scope's and sparsify's layouts as it does for the hub. A spec that can
    only be a local path (absolute, ./, ../, ~, or an existing file) but is no folder is a one-line error."""
    if hub_spec(spec):
        return None
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise SaelabError(f"{spec} is a file: pass the folder that holds the SAE (or ORG/REPO/SUBFOLDER on the hub)")
    if str(spec).startswith(("/", "./", "../", "~")):
        raise SaelabError(f"{spec}: no such folder (a hub SAE is ORG/REPO/SUBFOLDER, or hf://ORG/REPO/SUBFOLDER)")
    return None


def _read_local_sae(folder: pathlib.Path, target: dict | None = None):
    """(layout, {file name: path}, SAE converted from another layout or None) of the local SAE folder ``folder``;
    ``target``: fetch's --model / --hook, which the conversion takes instead of telling them itself."""
    from saelab.formats import LAYOUT_HELP, LAYOUTS, SPARSIFY_RUN_CFG, convert, folder_layout

    layout = folder_layout(folder)
    if layout is None:
        raise SaelabError(f"{folder} holds no SAE saelab reads ({LAYOUT_HELP}): pass the folder of one")
    files = {f: folder / f for f in LAYOUTS[layout]}
    if layout == "saelens":
        return layout, files, None
    run_cfg = read_json_object(folder.parent / SPARSIFY_RUN_CFG) if layout == "sparsify" else None
    return layout, files, convert(layout, files, "", folder.as_posix(), run_cfg, target)


def _read_hub_sae(spec: str, revision: str | None, cache_dir, target: dict | None = None):
    """(layout, {file name: cached path}, SAE) of ``spec``: the SAE converted from another layout (saelab.formats;
    ``target``: fetch's --model / --hook, taken as they are), or None for the SAELens layout, whose cached folder
    ``SAE.load`` reads as it is."""
    from saelab.formats import convert

    layout, files = _download_sae(spec, revision, cache_dir)
    if layout == "saelens":
        return layout, files, None
    repo, sub = parse_spec(spec)
    run_cfg = _sparsify_run_cfg(repo, sub, revision, cache_dir) if layout == "sparsify" else None
    return layout, files, convert(layout, files, repo, sub, run_cfg, target)


def load_hub_sae(spec: str, device="cpu", revision: str | None = None, cache_dir=None):
    """The SAE of hub spec ``spec`` read straight from the Hugging Face cache (downloaded first when not cached),
    in any layout saelab reads (what ``SAE.load("hf://…")`` does)."""
    from saelab.sae.base import SAE

    layout, files, sae = _read_hub_sae(spec, revision, cache_dir)
    if sae is None:
        return SAE.load(files[CFG_FILE].parent, device)
    from saelab.models import pick_device

    return sae.to(pick_device(device))


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
    from saelab.models import hook_layer

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
    from saelab.sae.base import SAE

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
    from saelab.sae.base import SAE
    from saelab.store import no_empty_folder_left

    _key(spec)  # a malformed hub spec: its one-line error before anything else
    _check_revision([spec], revision)
    target = _target(model, hook)
    out = pathlib.Path(out).expanduser() if out is not None else default_out(spec)
    if out.exists() and not out.is_dir():
        raise SaelabError(f"--out {out} is a file: pass a folder path")
    if out.is_dir() and any(out.iterdir()):
        if _holds(out, spec, revision, target):
            return out, SAE.load(out), False  # fetched before (delete the folder to fetch again)
        raise SaelabError(f"--out {out} already exists and holds something else: choose a new --out")
    _quiet_bars(progress)
    with no_empty_folder_left(out.parent):
        tmp = out.parent / f".{out.name}.fetching-{os.getpid()}"
        sae = _stage(spec, revision, cache_dir, tmp, target)
        try:
            if out.is_dir():
                out.rmdir()  # an empty folder made beforehand
            os.replace(tmp, out)
            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out, sae, True


def fetch_group(specs: list[str], out, revision: str | None = None, cache_dir=None, progress: bool = True,
                model: str | None = None):
    """Download several hub SAEs of one model, one per hook, into the group folder ``out``
    (``out/<hook>/`` + ``group.json``, as ``saelab train`` writes a group: circuits, the app and analyze
    take it). All are downloaded and checked before any is moved into place; a failure leaves nothing.
    ``model``: record this model for every SAE instead of what they came with.
    Returns (out, {hook: SAE}, fetched: False when ``out`` already held this group)."""
    from saelab.config import GROUP_FILE, group_json, read_group
    from saelab.sae.base import SAE
    from saelab.store import no_empty_folder_left

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
    if out.is_dir() and any(out.iterdir()):
        group = read_group(out)
        if group and len(group[1]) == len(specs) and all(
                any(_holds(f, s, revision, target) for f in group[1].values()) for s in specs):
            return out, {h: SAE.load(f) for h, f in group[1].items()}, False
        raise SaelabError(f"--out {out} already exists and holds something else: choose a new --out")
    _quiet_bars(progress)
    with no_empty_folder_left(out):
        out.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[str, pathlib.Path, object]] = []
        placed: list[pathlib.Path] = []
        try:
            for i, spec in enumerate(specs):
                tmp = out / f".fetching-{os.getpid()}-{i}"
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
            if len(models) > 1:
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
