"""One validator for the files saelab reads: each format declares a JSON Schema beside its reader, and ``check``
holds a parsed file to it, so every field has a type and a range and a refusal names the file, the field and the fix.

Types are those of the data, stricter than JSON's: an ``integer`` is a whole number (not ``true``, not ``1.0``),
a ``number`` is finite (Python's json reads ``NaN`` and ``Infinity``; no saelab file holds them). Schemas are
plain dicts (Draft 2020-12), so the reference pages print them and any JSON Schema tool reads them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

from saelab.errors import SaelabError
from saelab.fs import read_text

#: a name read from a file (a shard in a manifest, an SAE folder in group.json): an entry of its folder, never a
#: path, so nothing a file says leads a reader or a writer outside the folder
PLAIN_NAME = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\\x00]+$",
              "description": "a name inside its folder (no / or \\, not . or ..)"}
WHOLE = {"type": "integer", "minimum": 0}
POSITIVE = {"type": "integer", "minimum": 1}
NUMBER = {"type": "number"}
TEXT = {"type": "string"}
BOOL = {"type": "boolean"}


def nullable(schema: dict) -> dict:
    """``schema`` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict, required=(), extra: bool = True, patterns: dict | None = None) -> dict:
    """An object with these properties (``required`` among them), and keys matching ``patterns`` (regex → schema);
    other keys are allowed unless not ``extra`` (a newer saelab may add fields an older one ignores)."""
    out = {"type": "object", "properties": properties, "required": list(required), "additionalProperties": extra}
    return {**out, "patternProperties": patterns} if patterns else out


#: how a refusal words each JSON type
_KINDS = {"integer": "a whole number", "number": "a finite number", "string": "text", "object": "an object",
          "array": "a list", "boolean": "true or false", "null": "null"}


def _is_whole(_checker, v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(_checker, v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


#: id of a schema → (its validator, the schema): the schema is kept alive with its validator, so its id stays its own
_VALIDATORS: dict[int, tuple[Any, dict]] = {}


def _validator(schema: dict):
    """The (cached) validator of a schema: schemas are module constants, so their id is their key."""
    if id(schema) not in _VALIDATORS:
        import jsonschema

        base = jsonschema.Draft202012Validator
        types = base.TYPE_CHECKER.redefine_many({"integer": _is_whole, "number": _is_finite})
        _VALIDATORS[id(schema)] = (jsonschema.validators.extend(base, type_checker=types)(schema), schema)
    return _VALIDATORS[id(schema)][0]


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def field_name(path) -> str:
    """A field's place in a file as a reader writes it: ``shards[0].file``, ``hooks["blocks.0.hook_z"]``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.isidentifier():
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out or "the top level"


def problem(value, schema: dict) -> str | None:
    """The first way ``value`` breaks ``schema``, as "FIELD: what is wrong" (None when it holds). A subschema's
    ``description`` words what a value must be ("a latent id") where the schema's own message would quote a pattern."""
    import jsonschema

    errors = list(_validator(schema).iter_errors(value))
    if not errors:
        return None
    e = jsonschema.exceptions.best_match(errors)
    while e.context:  # an anyOf: the branch that came closest says more than "is not valid under any"
        e = jsonschema.exceptions.best_match(e.context)
    field = field_name(e.absolute_path)
    described = e.schema.get("description") if isinstance(e.schema, dict) else None
    if e.validator == "type":
        kinds = e.validator_value if isinstance(e.validator_value, list) else [e.validator_value]
        described = " or ".join(_KINDS.get(k, k) for k in kinds)
    what = f"{_short(repr(e.instance), 60)} is not {described}" if described else _short(e.message)
    return f"{field}: {what}"


def check(value, schema: dict, file, what: str, fix: str):
    """``value`` (parsed from ``file``, a ``what``: "group file") when it holds to ``schema``, else a one-line
    SaelabError naming the file, the field and ``fix``."""
    why = problem(value, schema)
    if why:
        raise SaelabError(f"{file} is not a valid {what}: {why}; {fix}")
    return value


def read_json(path: str | os.PathLike, schema: dict, what: str, fix: str):
    """The JSON file ``path`` (a ``what``) parsed and checked against ``schema``. A missing file raises
    FileNotFoundError (the caller knows whether it is optional); one that is unreadable, not JSON, or off the
    schema is a one-line SaelabError naming the file, the field and ``fix``."""
    path = pathlib.Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise SaelabError(f"{path} is not readable ({getattr(e, 'strerror', None) or e}); {fix}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SaelabError(f"{path} is not a valid {what}: not JSON ({e.msg}, line {e.lineno}); {fix}") from None
    return check(value, schema, path, what, fix)
