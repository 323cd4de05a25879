"""mkdocs hook: the executed notebooks of ``notebooks/`` as pages under ``notebooks/`` of the site.

The notebooks live at the repository root (Jupyter opens them there, the tests execute them), not
in ``docs/``; this hook adds each ``notebooks/*.ipynb`` to the site's files before mkdocs-jupyter
converts them (``execute: false``: the committed outputs are what the pages show).

Their figures are Plotly outputs (``application/vnd.plotly.v1+json``), which nbconvert does not
draw. The hook gives each such output an HTML form (a div and a ``Plotly.newPlot`` call) in a
temporary copy of the notebook, ships the ``plotly.min.js`` of the installed plotly package with
the site, and loads it in the head of the pages that have figures: the figures are interactive
and need no network, neither to build nor to view.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import tempfile

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.hooks.notebooks")

PLOTLY_MIME = "application/vnd.plotly.v1+json"
PLOTLY_JS = "assets/javascripts/plotly.min.js"

_tmp: pathlib.Path | None = None
_with_figures: set[str] = set()


def _notebooks_dir(config) -> pathlib.Path:
    return pathlib.Path(config.config_file_path).resolve().parent / "notebooks"


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the .ipynb files it finds
def on_files(files, config):
    global _tmp
    _cleanup()
    _with_figures.clear()
    source = _notebooks_dir(config)
    notebooks = sorted(source.glob("*.ipynb"))
    if not notebooks:
        return files
    _tmp = pathlib.Path(tempfile.mkdtemp(prefix="saelab-docs-notebooks-"))
    for nb_path in notebooks:
        uri = f"notebooks/{nb_path.name}"
        if files.get_file_from_path(uri) is not None:
            continue  # a page of that name in docs/ wins
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        if add_plotly_html(nb):
            _with_figures.add(uri)
        copy = _tmp / uri
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(json.dumps(nb), encoding="utf-8")
        # a File with a source folder of its own (not File.generated): mkdocs-jupyter's wrapper
        # derives the source path from src_dir and src_uri
        files.append(File(uri, src_dir=str(_tmp), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    if _with_figures:
        plotly_js = _plotly_js()
        if plotly_js is None:
            log.warning("plotly is not installed: the notebooks' figures cannot be drawn "
                        "(pip install -e '.[docs]')")
        else:
            files.append(File.generated(config, PLOTLY_JS, abs_src_path=str(plotly_js)))
    return files


def on_post_page(output: str, page, config):
    if page.file.src_uri in _with_figures and "</head>" in output:
        src = get_relative_url(PLOTLY_JS, page.url or ".")
        output = output.replace("</head>", f'<script src="{src}"></script>\n</head>', 1)
    return output


def on_serve(server, config, builder):
    server.watch(str(_notebooks_dir(config)))
    return server


def on_post_build(config):
    _cleanup()


def on_shutdown():
    _cleanup()


def _cleanup() -> None:
    global _tmp
    if _tmp is not None:
        shutil.rmtree(_tmp, ignore_errors=True)
        _tmp = None


def _plotly_js() -> pathlib.Path | None:
    try:
        import plotly
    except ImportError:
        return None
    path = pathlib.Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


def add_plotly_html(nb: dict) -> int:
    """Give every Plotly output of ``nb`` a ``text/html`` form in place of its JSON (in place);
    returns how many there were."""
    n = 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data") or {}
            if PLOTLY_MIME not in data:
                continue
            figure = data.pop(PLOTLY_MIME)
            data.pop("text/plain", None)
            data["text/html"] = figure_html(figure, f"plotly-figure-{n}")
            n += 1
    return n


def figure_html(figure: dict, div_id: str) -> str:
    layout = figure.get("layout") or {}
    height = layout.get("height") or 450
    config = {"responsive": True, **(figure.get("config") or {})}
    payload = ", ".join(json.dumps(part).replace("</", "<\\/")
                        for part in (figure.get("data") or [], layout, config))
    return (f'<div id="{div_id}" class="plotly-graph-div" style="height:{int(height)}px; width:100%;"></div>\n'
            f'<script>if (window.Plotly) {{ Plotly.newPlot("{div_id}", {payload}); }}</script>\n')
