"""The one place a benchmark's result file is made: the run's environment block, its tables, the JSON.

A script builds its tables here as it measures, so that what it prints and what it writes are the same
figures from the same run::

    from results import Result

    res = Result("bench_train", "Training step rate", "What is measured and how (markdown).")
    t = res.table("Step rate", ["d_in", "arch", "tokens/s"], fmt={"tokens/s": ",.0f"})
    t.row(128, "topk", 123456.0)      # printed at once as a markdown table line
    t.note = "batch 4096, ..."        # optional markdown, printed under the table
    res.write()                       # benchmarks/results/bench_train.json

``Result`` records the environment when it is made (``environment()``: the load average before the run
among it) and ``write`` adds the load average after it. The file goes to ``$SAELAB_BENCH_RESULTS`` when
that is set, else to ``benchmarks/results/``; it is replaced atomically (a temporary name in the same
folder, fsync, ``os.replace``), so a reader never sees half a file. Numbers stay numbers in the JSON;
NaN and infinities become null.

The file's schema (what the docs' renderer reads)::

    {"name", "title", "description", "command",
     "env": {"date", "git_sha", "git_dirty", "cpu", "cores", "load_before", "load_after", "python",
             "torch", "triton", "threads", "device"},
     "tables": [{"title", "columns", "rows", "note"}]}

``date``: the start, UTC, ISO 8601; ``git_dirty``: a tracked file differs from ``git_sha`` (null outside a git
checkout); ``load_before``/``load_after``: the 1, 5 and 15 minute load averages at the start and the end;
``threads``: the torch threads the measurements ran with; ``device``: "cpu" or "cuda: <name>". ``note`` is null
where a table has none; each row has one cell per column: a number (floats to 6 significant digits), a string,
or null (nothing there, or a NaN).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import numbers
import os
import pathlib
import platform
import shlex
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_ENV = "SAELAB_BENCH_RESULTS"
# what the runs themselves write: a result file rewritten there does not make the checkout differ from its commit
_OWN_OUTPUT = "benchmarks/results"


def results_dir() -> pathlib.Path:
    """Where result files go: ``$SAELAB_BENCH_RESULTS``, else ``benchmarks/results/``."""
    return pathlib.Path(os.environ.get(RESULTS_ENV) or HERE / "results")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_line(argv: list[str] | None = None) -> str:
    """The run's command as typed from the repository root: ``python benchmarks/<script>.py <its flags>``."""
    argv = sys.argv if argv is None else argv
    script = pathlib.Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


def environment(threads: int | None = None, device: str = "cpu") -> dict:
    """The machine and code of this run, at its start. ``threads``: the torch threads the measurements run
    with, where that is not this process's own (e.g. children started with ``--threads``); ``device``:
    "cpu" or "cuda: <name>". ``load_after`` is filled by ``Result.write``."""
    import torch

    sha = _git("rev-parse", "HEAD")
    # git_dirty: a tracked file differs from git_sha. Untracked files (stores, demo runs, a new module no tracked
    # file imports yet) leave the code that runs as committed, so they do not count.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){_OWN_OUTPUT}")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "git_sha": sha.strip() if sha else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_before": _load(),
        "load_after": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "threads": threads if threads else torch.get_num_threads(),
        "device": device,
    }


def cell(v):
    """A table cell as JSON keeps it: bool, int, a finite float, a string, or None (NaN and infinities)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if hasattr(v, "item") and not isinstance(v, numbers.Number):  # a 0-d tensor or numpy array
        v = v.item()
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        v = float(v)
        # 6 significant digits: far finer than any timing's run-to-run noise, and a file a person can read
        return float(f"{v:.6g}") if math.isfinite(v) else None
    raise TypeError(f"a table cell is a number, a string or None, not {type(v).__name__}: {v!r}")


def _auto(v) -> str:
    """A number for the printed table where the column names no format."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return str(v)
    if isinstance(v, numbers.Integral):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def _dumps(obj, indent: str = "") -> str:
    """JSON with objects and lists of lists indented, and each list of plain values (a row, a load
    average, the columns) on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


class Table:
    """One table of a result: its header is printed when it is made, each row when it is added."""

    def __init__(self, title: str, columns: list[str], note: str | None = None, fmt: dict | None = None):
        self.title, self.columns, self.note = title, list(columns), note
        self.fmt = dict(fmt or {})
        unknown = set(self.fmt) - set(self.columns)
        if unknown:
            raise ValueError(f"fmt names columns the table does not have: {sorted(unknown)}")
        self.rows: list[list] = []
        self.echo = False  # printing from open() to close()

    def open(self) -> None:
        """Print the title and the header; from now on each row is printed as it is added."""
        print(f"\n### {self.title}\n", flush=True)
        print("| " + " | ".join(self.columns) + " |")
        print("|" + "---|" * len(self.columns), flush=True)
        self.echo = True

    def text(self, col: str, v) -> str:
        """Cell ``v`` of column ``col`` as the printed table shows it (empty for None and NaN)."""
        v = cell(v)
        if v is None:
            return ""
        spec = self.fmt.get(col)
        if spec and isinstance(v, numbers.Number) and not isinstance(v, bool):
            return spec(v) if callable(spec) else format(v, spec)
        return _auto(v)

    def row(self, *values) -> list:
        """Add a row (one value per column) and print it."""
        if len(values) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(values)} values for {len(self.columns)} columns")
        r = [cell(v) for v in values]
        self.rows.append(r)
        if self.echo:
            print("| " + " | ".join(self.text(c, v) for c, v in zip(self.columns, values)) + " |", flush=True)
        return r

    def close(self) -> None:
        """Print the note under the rows (the note may be set after the rows, from what they measured)."""
        if self.echo and self.note:
            print(f"\n{self.note}", flush=True)
        self.echo = False

    def to_json(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


class Result:
    """A benchmark run's result: ``name`` (the script's, and the file's: ``<name>.json``), a title, a
    markdown description of what is measured and how, the environment (``environment()`` unless given:
    call this at the start of the run) and its tables."""

    def __init__(self, name: str, title: str, description: str, env: dict | None = None, **env_kw):
        self.name, self.title, self.description = name, title, description
        self.command = command_line()
        self.env = env if env is not None else environment(**env_kw)
        self.tables: list[Table] = []

    def table(self, title: str, columns: list[str], note: str | None = None, fmt: dict | None = None) -> Table:
        """A new table (the previous one is finished: its note printed). ``fmt``: {column: a format spec, or a
        function of the number returning its text} for the printed numbers (the JSON keeps the numbers)."""
        t = Table(title, columns, note, fmt)
        if self.tables:
            self.tables[-1].close()
        self.tables.append(t)
        t.open()
        return t

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "description": self.description, "command": self.command,
                "env": self.env, "tables": [t.to_json() for t in self.tables]}

    def write(self, folder: str | os.PathLike | None = None) -> pathlib.Path | None:
        """Record the load after the run and write ``<folder>/<name>.json`` atomically; returns its path. A run
        that made no table (e.g. a GPU-only run on a machine without one) writes nothing and returns None, so
        that it leaves an earlier run's file as it was."""
        if not self.tables:
            print(f"\nno table measured: {self.name}.json not written", file=sys.stderr, flush=True)
            return None
        self.tables[-1].close()
        self.env["load_after"] = _load()
        folder = pathlib.Path(folder) if folder is not None else results_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        text = _dumps(self.to_json()) + "\n"
        tmp = folder / f".{self.name}.json.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        try:  # the rename itself reaches the disk
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        print(f"\nwrote {path}", file=sys.stderr, flush=True)
        return path
