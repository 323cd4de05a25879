"""mkdocs hook: benchmark results, rendered at build time from ``benchmarks/results/NAME.json``.

A page places a result with a line of its own::

    <!-- bench: bench_train -->
    <!-- bench: bench_vs_saelens | make bench-venv && python benchmarks/bench_vs_saelens.py -->

and the hook replaces it with the result's title, description, tables, command and measuring
environment (plus a warning when the machine was loaded). The text after ``|`` is the command a
reader runs to measure it when the file is missing (default: ``python benchmarks/NAME.py``).
``<!-- bench-index -->`` becomes a table of every result: what, when, where. No number on these
pages is typed by hand; a file that is not there is a note, not a build error.

The file (written by each benchmark script)::

    {"name", "title", "description" (markdown), "command",
     "env": {"date", "git_sha", "git_dirty", "cpu", "cores", "load_before": [1, 5, 15 min],
             "load_after", "python", "torch", "triton", "threads", "device"},
     "tables": [{"title", "columns": [...], "rows": [[...], ...], "note" (markdown, optional),
                 "formats" (optional: {column: a Python format spec such as ",.0f" or ".3f"})}]}

Cells are formatted by ``fmt`` (thousands separators, 3 significant digits) unless the table's
``formats`` names a spec for the column.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import pathlib
import re

log = logging.getLogger("mkdocs.hooks.benchmarks")

MARKER = re.compile(r"^<!--\s*bench:\s*([A-Za-z0-9_.-]+)\s*(?:\|\s*(.*?))?\s*-->[ \t]*$", re.M)
INDEX_MARKER = "<!-- bench-index -->"
# a column whose name says it holds a ratio is shown with 3 significant digits whatever its size
RATIO_WORDS = ("ratio", "fraction", "×", " / ", "speed-up", "speedup", "share", "vs ")

_results_dir: pathlib.Path | None = None


def on_config(config):
    global _results_dir
    _results_dir = pathlib.Path(config.config_file_path).resolve().parent / "benchmarks" / "results"
    return config


def on_serve(server, config, builder):
    if _results_dir is not None and _results_dir.is_dir():
        server.watch(str(_results_dir))
    return server


def on_page_markdown(markdown: str, page, config, files) -> str:
    results = _results_dir or pathlib.Path("benchmarks/results")
    if INDEX_MARKER in markdown:
        markdown = markdown.replace(INDEX_MARKER, render_index(results, page_of=_page_of(files)))
    return MARKER.sub(lambda m: render_marker(m.group(1), results, m.group(2)), markdown)


def _page_of(files):
    """Benchmark name -> the page (relative to the index) that shows it, for the index's links."""
    pages = {}
    for f in files.documentation_pages() if files is not None else ():
        uri = f.src_uri
        if uri.startswith("benchmarks/") and uri.endswith(".md") and not uri.endswith("index.md"):
            pages[pathlib.PurePosixPath(uri).stem] = uri[len("benchmarks/"):]
    return pages


def load_result(name: str, results_dir: pathlib.Path) -> dict | None:
    """The parsed ``NAME.json``, or None when it does not exist. A file that is not valid JSON,
    or not a result, logs a warning (which fails ``mkdocs build --strict``) and reads as None."""
    path = pathlib.Path(results_dir) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("benchmark result %s is not readable JSON: %s", path, e)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("tables", []), list):
        log.warning("benchmark result %s is not a result object (see docs/hooks/benchmarks.py)", path)
        return None
    return data


def render_marker(name: str, results_dir: pathlib.Path, command: str | None = None) -> str:
    data = load_result(name, results_dir)
    if data is None:
        return render_missing(name, command)
    return render_result(data)


def render_missing(name: str, command: str | None = None) -> str:
    command = command or f"python benchmarks/{name}.py"
    return (f'!!! note "Not measured yet"\n\n'
            f"    Not measured yet: run `{command}`. It writes `benchmarks/results/{name}.json`, "
            f"which the next `make docs` renders here.\n")


def render_result(data: dict, heading_level: int = 2) -> str:
    h = "#" * heading_level
    parts = []
    if data.get("title"):
        parts.append(f"{h} {_inline(str(data['title']))}")
    if data.get("description"):
        parts.append(str(data["description"]).strip())
    env = data.get("env") or {}
    loaded = loaded_note(env)
    if loaded:
        parts.append(loaded)
    for table in data.get("tables") or []:
        parts.append(render_table(table, heading_level + 1))
    if data.get("command"):
        parts.append(f"Command: `{data['command']}`")
    line = env_line(env)
    if line:
        parts.append(line)
    return "\n\n".join(parts) + "\n"


def render_table(table: dict, heading_level: int = 3) -> str:
    columns = [str(c) for c in table.get("columns") or []]
    rows = table.get("rows") or []
    parts = []
    if table.get("title"):
        parts.append(f"{'#' * heading_level} {_inline(str(table['title']))}")
    if columns:
        cells = []
        for row in rows:
            row = list(row) if isinstance(row, (list, tuple)) else [row]
            if len(row) != len(columns):
                log.warning("benchmark table %r: a row of %d values under %d columns",
                            table.get("title", ""), len(row), len(columns))
                row = (row + [None] * len(columns))[:len(columns)]
            cells.append(row)
        numeric = [bool(cells) and all(r[i] is None or _is_number(r[i]) for r in cells) for i in range(len(columns))]
        lines = ["| " + " | ".join(_cell_text(c) for c in columns) + " |",
                 "|" + "|".join("--:" if n else "---" for n in numeric) + "|"]
        specs = table.get("formats") if isinstance(table.get("formats"), dict) else {}
        lines += ["| " + " | ".join(_cell(v, c, specs.get(c)) for v, c in zip(row, columns)) + " |" for row in cells]
        parts.append("\n".join(lines))
    if table.get("note"):
        parts.append(str(table["note"]).strip())
    return "\n\n".join(parts)


def _cell(value, column: str, spec: str | None) -> str:
    if spec and _is_number(value):
        try:
            return format(value, spec)
        except (ValueError, TypeError):
            log.warning("benchmark column %r: format %r does not apply to %r", column, spec, value)
    return fmt(value, column)


def fmt(value, column: str = "") -> str:
    """One table cell: integers with thousands separators, other numbers to 3 significant digits
    (large ones rounded to whole numbers with separators), empty for None, text escaped."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if abs(value) >= 1000 and not _is_ratio(column):
            return f"{value:,.0f}"
        return sig3(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, column) for v in value)
    if isinstance(value, dict):
        return _cell_text(json.dumps(value))
    return _cell_text(str(value))


def sig3(value: float) -> str:
    """``value`` to 3 significant digits: 0.0851, 4.78, 12.3, 457, 1,230."""
    if value == 0:
        return "0"
    rounded = float(f"{value:.3g}")
    if abs(rounded) >= 1000:
        return f"{rounded:,.0f}"
    return f"{rounded:.3g}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_ratio(column: str) -> bool:
    c = column.lower()
    return any(w in c for w in RATIO_WORDS)


def loaded_note(env: dict) -> str:
    """A warning admonition when the 1-minute load average before or after the run exceeds half
    the core count; empty otherwise (or when the file does not say)."""
    cores = env.get("cores")
    before, after = _load1(env.get("load_before")), _load1(env.get("load_after"))
    if not isinstance(cores, (int, float)) or cores <= 0:
        return ""
    if not any(x is not None and x > cores / 2 for x in (before, after)):
        return ""
    said = " and ".join(f"{sig3(x)} {when}" for x, when in ((before, "before"), (after, "after")) if x is not None)
    return ('!!! warning "Taken on a loaded machine"\n\n'
            f"    The 1-minute load average was {said} the run, on {fmt(cores)} cores: other work "
            "shared the CPU, so absolute rates are low, and even ratios of alternated runs move with the load.\n")


def _load1(load):
    if isinstance(load, (list, tuple)) and load and isinstance(load[0], (int, float)):
        return float(load[0])
    if isinstance(load, (int, float)):
        return float(load)
    return None


def env_line(env: dict) -> str:
    """One line saying when, on which commit and on what the result was measured."""
    if not env:
        return ""
    bits = []
    if env.get("date"):
        bits.append(f"measured {_date(str(env['date']))}")
    if env.get("git_sha"):
        sha = str(env["git_sha"])[:10]
        bits.append(f"at `{sha}`" + (" with uncommitted changes" if env.get("git_dirty") else ""))
    machine = []
    if env.get("cpu"):
        machine.append(_inline(str(env["cpu"])))
    if env.get("cores") is not None:
        machine.append(f"{fmt(env['cores'])} cores")
    if env.get("threads") is not None:
        machine.append(f"{fmt(env['threads'])} torch threads")
    if env.get("device"):
        machine.append(f"device {_inline(str(env['device']))}")
    if machine:
        bits.append("on " + ", ".join(machine))
    versions = [f"{label} {env[key]}" for key, label in (("python", "Python"), ("torch", "torch"),
                                                         ("triton", "triton")) if env.get(key)]
    if "triton" in env and not env.get("triton"):
        versions.append("no triton")
    if versions:
        bits.append(", ".join(_inline(v) for v in versions))
    if not bits:
        return ""
    text = "; ".join(bits)
    return f"<small>{text[:1].upper() + text[1:]}.</small>"


def _date(text: str) -> str:
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return _inline(text)
    if when.tzinfo is not None:
        return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return when.strftime("%Y-%m-%d %H:%M")


def render_index(results_dir: pathlib.Path, page_of: dict | None = None) -> str:
    """A table of every result file: its page, title, when and where it was measured."""
    page_of = page_of or {}
    names = sorted(set(page_of) | {p.stem for p in pathlib.Path(results_dir).glob("*.json")})
    if not names:
        return "No benchmark has been measured yet."
    lines = ["| benchmark | what | measured | machine |", "|---|---|---|---|"]
    for name in names:
        data = load_result(name, results_dir)
        link = f"[`{name}`]({page_of[name]})" if name in page_of else f"`{name}`"
        if data is None:
            lines.append(f"| {link} | — | not yet | — |")
            continue
        env = data.get("env") or {}
        when = _date(str(env["date"])) if env.get("date") else "—"
        machine = ", ".join(x for x in (_cell_text(str(env.get("cpu") or "")),
                                        f"{env['cores']} cores" if env.get("cores") else "",
                                        _cell_text(str(env.get("device") or ""))) if x) or "—"
        if loaded_note(env):
            machine += " (loaded)"
        lines.append(f"| {link} | {_cell_text(str(data.get('title') or ''))} | {when} | {machine} |")
    return "\n".join(lines)


def _inline(text: str) -> str:
    return html.escape(" ".join(text.split()), quote=False)


def _cell_text(text: str) -> str:
    return _inline(text).replace("|", "\\|")
