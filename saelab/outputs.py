"""The output policy of the commands that write one report file (a circuit, a comparison, a steering run, a head
ranking, exported cards): what they may write over.

- never a file the command reads (``inputs``), nor a file of saelab's on-disk layout (an SAE's weights or
  ``cfg.json``, a feature database, a store's manifest or shards, …), with or without ``--force``;
- an existing file that this command wrote before (its ``written_by`` stamp, or its format's own marker) is
  replaced, atomically, and the command says so;
- any other existing file only with ``--force``.

Every report file carries the stamp: JSON reports a top-level ``written_by`` ("saelab VERSION COMMAND"), HTML a
``<meta name="generator">``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from saelab import __version__
from saelab.errors import SaelabError
from saelab.fs import check_output
from saelab.layout import (
    CFG_FILE,
    CHECKPOINT_FILE,
    EVAL_FILE,
    FEATURES_FILE,
    GROUP_FILE,
    LABELS_FILE,
    MANIFEST,
    METRICS_FILE,
    MFR_FILE,
    RUN_FILE,
    SOURCE_FILE,
    TRAIN_FILE,
    WEIGHTS_FILE,
)

WRITTEN_BY = "written_by"
#: the names of saelab's own files: a report written over one of them would destroy an SAE, a store or a run
LAYOUT_NAMES = frozenset({CFG_FILE, WEIGHTS_FILE, TRAIN_FILE, METRICS_FILE, CHECKPOINT_FILE, EVAL_FILE, FEATURES_FILE,
                          LABELS_FILE, SOURCE_FILE, GROUP_FILE, MFR_FILE, MANIFEST, RUN_FILE})
_SHARD = re.compile(r"^shard_\d{5}\.h5$")
#: markers older report files carry instead of a stamp: (key, value) of a JSON report
_FORMAT_MARKERS = {"circuit": ("kind", "sparse_feature_circuit")}


def stamp(command: str) -> str:
    """The ``written_by`` value of a report that ``command`` writes."""
    return f"saelab {__version__} {command}"


def html_generator(command: str) -> str:
    """The ``<meta>`` tag an HTML report of ``command`` carries."""
    return f'<meta name="generator" content="{stamp(command)}">'


def written_by(path: pathlib.Path, command: str) -> bool:
    """Whether the file ``path`` is a report that ``command`` wrote (any saelab version)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if path.suffix.lower() in (".html", ".htm"):
        return re.search(rb'<meta name="generator" content="saelab [^" ]+ ' + re.escape(command.encode()) + rb'"',
                         head) is not None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(doc, dict):
        return False
    mark = doc.get(WRITTEN_BY)
    if isinstance(mark, str) and mark.startswith("saelab ") and mark.endswith(" " + command):
        return True
    key, value = _FORMAT_MARKERS.get(command, (None, None))
    return key is not None and doc.get(key) == value


def _same(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_report(path: str | os.PathLike, command: str, *, flag: str = "--out", example: str = "out.json",
                 inputs=(), force: bool = False) -> tuple[pathlib.Path, bool]:
    """A report file's path, checked before the work (see the module docstring): (the path, whether it replaces a
    file). ``inputs``: the files and folders the command reads (a report is never written into a store or over
    an input). A refusal is a one-line SaelabError naming ``flag`` and the fix."""
    path = pathlib.Path(path).expanduser()
    if path.name in LAYOUT_NAMES or _SHARD.match(path.name):
        raise SaelabError(f"{flag} {path}: {path.name} is the name of one of saelab's own files (an SAE, a store or a "
                          f"run holds it): choose another name, e.g. {path.with_name(example)}")
    for src in inputs:
        src = pathlib.Path(src).expanduser()
        if _same(path, src):
            raise SaelabError(f"{flag} {path} is one of this command's inputs: choose a file elsewhere")
        if src.is_dir() and (src / MANIFEST).is_file() and path.resolve().is_relative_to(src.resolve()):
            raise SaelabError(f"{flag} {path} is inside the store {src}: choose a file elsewhere")
    path = check_output(path, flag, example)
    exists = path.is_file()
    if exists and not force and not written_by(path, command):
        raise SaelabError(f"{flag} {path} exists and is not a file saelab {command} wrote: choose another file, or "
                          "pass --force to replace it")
    if path.exists() and not path.is_file():
        raise SaelabError(f"{flag} {path} is not a regular file: choose a file name")
    return path, exists


def write_report(path: pathlib.Path, doc: dict, command: str, flag: str = "--out", indent: int | None = None
                 ) -> pathlib.Path:
    """Write the JSON report ``doc`` of ``command`` to ``path`` (checked by ``check_report``), stamped, NaN as
    null, atomically."""
    from saelab.fs import finite_json, write_output

    text = json.dumps(finite_json({WRITTEN_BY: stamp(command), **doc}), indent=indent) + "\n"
    return write_output(path, text, flag)


def wrote(path: pathlib.Path, replaced: bool) -> str:
    """The line a command prints for the report it wrote."""
    return f"wrote {path}" + (" (replaced the existing file)" if replaced else "")
