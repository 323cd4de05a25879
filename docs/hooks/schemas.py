"""mkdocs hook: the field tables of saelab's file formats, rendered from the JSON Schemas its readers check.

``<!-- schema: NAME -->`` becomes a table of every field of the format NAME (its place in the file, its type,
its range or choices, whether it is required), so the reference says exactly what ``saelab.schema`` accepts and
cannot drift from it.
"""

from __future__ import annotations

import json
import re


def schemas() -> dict[str, dict]:
    """Format name → its schema, as the readers hold files to them."""
    from saelab.analysis.circuits.file import CIRCUIT_SCHEMA
    from saelab.analysis.graphs.file import GRAPH_SCHEMA
    from saelab.analysis.features.records import ATTRS_SCHEMA
    from saelab.layout import (CFG_SCHEMA, EVAL_SCHEMA, GROUP_SCHEMA, LABELS_SCHEMA, RUN_SCHEMA, SOURCE_SCHEMA,
                               TRAIN_SCHEMA)
    from saelab.store.manifest import MANIFEST_SCHEMA

    return {"manifest.json": MANIFEST_SCHEMA, "harvest.json": RUN_SCHEMA, "cfg.json": CFG_SCHEMA,
            "train.json": TRAIN_SCHEMA, "eval.json": EVAL_SCHEMA, "labels.json": LABELS_SCHEMA,
            "source.json": SOURCE_SCHEMA, "group.json": GROUP_SCHEMA, "features.h5 attributes": ATTRS_SCHEMA,
            "circuit file": CIRCUIT_SCHEMA, "graph file": GRAPH_SCHEMA}


_MARKER = re.compile(r"<!-- schema: (.+?) -->")
_TYPES = {"integer": "whole number", "number": "number", "string": "text", "boolean": "true/false",
          "object": "object", "array": "list", "null": "null"}


def _merged(schema: dict) -> dict:
    """``schema`` with its ``allOf`` parts folded in (their properties and bounds)."""
    out = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema.get("allOf", []):
        part = _merged(part)
        out["properties"] = {**out.get("properties", {}), **part.get("properties", {})}
        for name, sub in part.get("properties", {}).items():
            if name in schema.get("properties", {}):  # a bound added to a field declared before
                out["properties"][name] = {**schema["properties"][name], **sub}
        out.setdefault("type", part.get("type"))
    return out


def _kind(schema: dict) -> tuple[str, str]:
    """(type, range or choices) of one value's schema."""
    schema = _merged(schema)
    if "anyOf" in schema:
        parts = [_kind(s) for s in schema["anyOf"]]
        return " or ".join(p[0] for p in parts), "; ".join(p[1] for p in parts if p[1])
    if "const" in schema:
        return "text" if isinstance(schema["const"], str) else "whole number", f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of", ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    kind = _TYPES.get(schema.get("type"), schema.get("type") or "any")
    bounds = []
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None and abs(lo) < 2**62:
        bounds.append(f"≥ {lo}")
    if schema.get("exclusiveMinimum") is not None:
        bounds.append(f"> {schema['exclusiveMinimum']}")
    if hi is not None and abs(hi) < 2**62:
        bounds.append(f"≤ {hi}")
    if schema.get("description"):
        bounds.append(schema["description"])
    elif schema.get("pattern"):
        bounds.append(f"matches `{schema['pattern']}`")
    return kind, ", ".join(bounds)


def rows(schema: dict, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(field, type, range, required) for every field of ``schema``, nested fields by their place (a list's items
    as ``[i]``, an object's values as ``[KEY]``)."""
    schema = _merged(schema)
    out = []
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        place = f"{prefix}.{name}" if prefix else name
        kind, limits = _kind(sub)
        out.append((place, kind, limits, "yes" if name in required else ""))
        out += _nested(_merged(sub), place)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        kind, limits = _kind(extra)
        key = schema.get("propertyNames", {}).get("description", "KEY")
        out.append((f"{prefix}[{key}]", kind, limits, ""))
        out += _nested(_merged(extra), f"{prefix}[{key}]")
    return out


def _nested(sub: dict, place: str) -> list:
    if "anyOf" in sub:
        return [r for s in sub["anyOf"] for r in _nested(_merged(s), place)]
    if sub.get("type") == "array" and isinstance(sub.get("items"), dict):
        items = _merged(sub["items"])
        return rows(items, f"{place}[i]") if items.get("type") == "object" else []
    if sub.get("type") == "object" and not sub.get("description"):  # a described object is named, not spelled out
        return rows(sub, place)
    return []


def render(name: str) -> str:
    table = schemas().get(name)
    if table is None:
        return f"*(no schema named {name!r})*"
    lines = ["| field | type | range | required |", "|---|---|---|---|"]
    for place, kind, limits, req in rows(table):
        lines.append(f"| `{place}` | {kind} | {limits.replace('|', '&#124;')} | {req} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return _MARKER.sub(lambda m: render(m.group(1)), markdown)
