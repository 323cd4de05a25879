"""mkdocs hook: saelab's import rules, drawn from the import-linter contracts at build time.

``<!-- import-layers -->`` becomes a mermaid diagram of the ``layers`` contract in
``pyproject.toml`` (``[tool.importlinter]``): one box per layer, top to bottom, siblings of a layer
side by side; a module may import only the layers below its own. ``<!-- import-contracts -->``
becomes a table of the other contracts (what may not import what). The page shows the rules
``lint-imports`` checks, not a copy of them.
"""

from __future__ import annotations

import logging
import pathlib

log = logging.getLogger("mkdocs.hooks.architecture")

LAYERS_MARKER = "<!-- import-layers -->"
CONTRACTS_MARKER = "<!-- import-contracts -->"
_pyproject: pathlib.Path | None = None


def on_config(config):
    global _pyproject
    _pyproject = pathlib.Path(config.config_file_path).resolve().parent / "pyproject.toml"
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    if LAYERS_MARKER not in markdown and CONTRACTS_MARKER not in markdown:
        return markdown
    contracts = load_contracts(_pyproject or pathlib.Path("pyproject.toml"))
    markdown = markdown.replace(LAYERS_MARKER, render_layers(contracts))
    return markdown.replace(CONTRACTS_MARKER, render_contracts(contracts))


def load_contracts(pyproject: pathlib.Path) -> dict:
    """``[tool.importlinter]`` of ``pyproject`` ({} with a warning when it has none)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            log.warning("reading pyproject.toml needs Python 3.11 or the tomli package")
            return {}
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        log.warning("cannot read %s: %s", pyproject, e)
        return {}
    linter = data.get("tool", {}).get("importlinter", {})
    if not linter.get("contracts"):
        log.warning("%s has no [tool.importlinter] contracts to draw", pyproject)
    return linter


def render_layers(linter: dict) -> str:
    layered = [c for c in linter.get("contracts", []) if c.get("type") == "layers"]
    if not layered:
        return "No layers contract is declared."
    out = []
    for contract in layered:
        root = (contract.get("containers") or [linter.get("root_package", "")])[0]
        lines = ["```mermaid", "flowchart TB"]
        for i, layer in enumerate(contract.get("layers", [])):
            siblings = [m.strip() for m in layer.split("|") if m.strip()]
            label = " · ".join(siblings)
            lines.append(f'    L{i}["{label}"]')
            if i:
                lines.append(f"    L{i - 1} --> L{i}")
        lines.append("```")
        out.append(f"**{contract.get('name', 'Layers')}** (modules of `{root}`; an arrow points to the "
                   "layers a box may import, and everything below them):\n\n" + "\n".join(lines))
    return "\n\n".join(out)


def render_contracts(linter: dict) -> str:
    rows = []
    for c in linter.get("contracts", []):
        kind = c.get("type")
        if kind == "forbidden":
            what = ", ".join(f"`{m}`" for m in c.get("source_modules", []))
            rule = "may not import " + ", ".join(f"`{m}`" for m in c.get("forbidden_modules", []))
        elif kind == "acyclic_siblings":
            what = ", ".join(f"`{m}`" for m in c.get("ancestors", []))
            rule = "no import cycles between sibling modules, at any depth"
        elif kind == "independence":
            what = ", ".join(f"`{m}`" for m in c.get("modules", []))
            rule = "independent of one another"
        elif kind == "layers":
            continue
        else:
            what, rule = "", f"a `{kind}` contract"
        rows.append(f"| {c.get('name', '')} | {what} | {rule} |")
    if not rows:
        return "No other contract is declared."
    return "| contract | modules | rule |\n|---|---|---|\n" + "\n".join(rows)
