"""The hub side of fetching: hub specs, listing a repo's SAEs, downloading one SAE's files into the Hugging Face
cache, and reading an SAE from the cache or from a local folder in any layout saelab reads.

The only module (with ``saelab.hub.fetch``) that reaches the network, through ``huggingface_hub`` (its cache, token
and ``HF_HUB_OFFLINE`` apply).
"""

from __future__ import annotations

import contextlib
import pathlib
import re

from saelab.device import pick_device
from saelab.errors import SaelabError, first_line
from saelab.formats import convert
from saelab.layout import (
    CFG_FILE,
    DICTIONARY_LEARNING_CFG,
    HUB_PREFIX,
    LAYOUT_HELP,
    LAYOUTS,
    SPARSIFY_RUN_CFG,
    WEIGHTS_FILE,
    folder_layout,
    hub_spec,
    layout_of,
    read_json_object,
)
from saelab.sae import SAE


def parse_spec(spec: str) -> tuple[str, str]:
    """``ORG/REPO[/SUBFOLDER…]`` (optionally ``hf://``-prefixed) → (repo id, subfolder or "")."""
    s = str(spec).strip().removeprefix(HUB_PREFIX)
    parts = s.strip("/").split("/") if s.strip("/") else []
    bad = next((x for x in parts if x.strip() in ("", ".", "..")), None)
    if bad is not None:  # a hub path is ORG/REPO/names: ".." would leave the repo (and the cache folder it maps to)
        raise SaelabError(f"{spec!r} is not a hub SAE: its path has {f'a {bad!r}' if bad.strip() else 'an empty'} "
                          "segment; pass ORG/REPO/SUBFOLDER with a name between each pair of slashes")
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

        raise SaelabError(f"{where} has no SAE in {folder or 'its root'} ({LAYOUT_HELP}): pass ORG/REPO/SUBFOLDER "
                          f"of a folder that holds one{_folders_hint(repo, revision)}") from None
    except e.HFValidationError as err:
        raise SaelabError(f"{repo!r} is not a hub repo id ({str(err).split(':')[0]}): pass ORG/REPO/SUBFOLDER") from None
    except e.HfHubHTTPError as err:
        raise SaelabError(f"{where}: the hub answered {first_line(err)}: retry later") from None


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
    (saelab.layout.LAYOUTS: cfg.json + the weights, or Gemma Scope's params.npz, or sparsify's)."""

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

    parent = sub.rstrip("/").rpartition("/")[0]
    return read_json_object(_probe(repo, f"{parent}/{SPARSIFY_RUN_CFG}" if parent else SPARSIFY_RUN_CFG, revision,
                                   cache_dir)) or {}


def local_folder(spec) -> pathlib.Path | None:
    """``spec`` as an existing local folder (absolute), else None (an ``hf://`` spec never is one): ``fetch`` takes
    a local SAE folder too, converting the other releases' layouts as it does for the hub. A spec that can
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

    layout = folder_layout(folder)
    if layout is None:
        raise SaelabError(f"{folder} holds no SAE saelab reads ({LAYOUT_HELP}): pass the folder of one")
    files = {f: folder / f for f in LAYOUTS[layout]}
    if layout == "saelens":
        return layout, files, None
    run_cfg = (read_json_object(folder.parent / SPARSIFY_RUN_CFG) if layout == "sparsify"
               else read_json_object(folder / DICTIONARY_LEARNING_CFG) if layout == "dictionary-learning" else None)
    return layout, files, convert(layout, files, "", folder.as_posix(), run_cfg, target)


def _read_hub_sae(spec: str, revision: str | None, cache_dir, target: dict | None = None):
    """(layout, {file name: cached path}, SAE) of ``spec``: the SAE converted from another layout (saelab.formats;
    ``target``: fetch's --model / --hook, taken as they are), or None for the SAELens layout, whose cached folder
    ``SAE.load`` reads as it is."""

    layout, files = _download_sae(spec, revision, cache_dir)
    if layout == "saelens":
        return layout, files, None
    repo, sub = parse_spec(spec)
    run_cfg = (_sparsify_run_cfg(repo, sub, revision, cache_dir) if layout == "sparsify"
               else read_json_object(_probe(repo, f"{sub}/{DICTIONARY_LEARNING_CFG}" if sub else DICTIONARY_LEARNING_CFG,
                                            revision, cache_dir)) or {} if layout == "dictionary-learning" else None)
    return layout, files, convert(layout, files, repo, sub, run_cfg, target)


def load_hub_sae(spec: str, device="cpu", revision: str | None = None, cache_dir=None):
    """The SAE of hub spec ``spec`` read straight from the Hugging Face cache (downloaded first when not cached),
    in any layout saelab reads (what ``SAE.load("hf://…")`` does)."""

    layout, files, sae = _read_hub_sae(spec, revision, cache_dir)
    if sae is None:
        return SAE.load(files[CFG_FILE].parent, device)

    return sae.to(pick_device(device))
