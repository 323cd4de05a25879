"""Configuration dataclasses: one source of truth for defaults, validation and ``--help``.

Each field documents itself once, in ``metadata["help"]``; the CLI builds its flags from
the fields (``add_arguments``), and runs store the config as JSON (``to_json``) so they can
be resumed from their folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any

from saelab import SaelabError


def _f(default=dataclasses.MISSING, help: str = "", **meta):  # noqa: A002 - mirrors argparse
    """A dataclass field whose metadata carries the CLI help (and optional flag settings)."""
    kw: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if isinstance(default, list):
        kw["default_factory"] = lambda d=default: list(d)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(**kw)


@dataclass
class HarvestConfig:
    """What `saelab harvest` does: which model, hooks, text and how to store the rows."""

    hooks: list[str] = _f(
        [],
        "TransformerLens hook name to record, e.g. blocks.1.hook_resid_post; repeat the flag for "
        "several (one pass of the model serves all); a glob such as 'blocks.*.hook_resid_post' "
        "expands to every matching hook",
        flag="--hook",
        required=True,
    )
    out: str = _f("", "output RUN folder; one store per hook is written to OUT/<hook>/", required=True)
    model: str = _f("tiny", "model: 'tiny' (bundled), a local Hugging Face folder, or a hub name such as gpt2")
    dataset: str = _f(
        "tiny",
        "text: 'tiny' (the bundled corpus), a local .txt/.jsonl/.json/.parquet file or folder, "
        "or a Hugging Face datasets hub name",
    )
    split: str = _f("train", "dataset split to read")
    text_column: str = _f("text", "column holding the text (json/jsonl/parquet/hub datasets)")
    context_size: int = _f(128, "tokens per context, BOS included")
    tokens: int | None = _f(None, "rows (tokens) to harvest; default: every whole context the dataset gives")
    dtype: str = _f("float32", "storage dtype of activations", choices=["float32", "float16"])
    batch_size: int = _f(32, "contexts per forward pass")
    shard_rows: int = _f(65536, "target rows per shard (rounded down to whole contexts)")
    holdout: float = _f(0.05, "fraction of contexts (the last ones) held out for evaluation, in their own shards")
    seed: int = _f(0, "seed of the document shuffle; the same seed gives byte-identical stores")
    with_grads: bool = _f(False, "also store the gradient of the next-token loss w.r.t. each hooked activation")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")

    def validate(self) -> "HarvestConfig":
        if not self.hooks:
            raise SaelabError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post)")
        if self.context_size < 2:
            raise SaelabError(f"--context-size must be at least 2 (got {self.context_size})")
        if self.tokens is not None and self.tokens < self.context_size:
            raise SaelabError(f"--tokens must be at least one context ({self.context_size}); got {self.tokens}")
        if not 0 <= self.holdout < 1:
            raise SaelabError(f"--holdout must be in [0, 1) (got {self.holdout})")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise SaelabError("--batch-size and --shard-rows must be positive")
        if self.shard_rows < self.context_size:
            raise SaelabError(f"--shard-rows ({self.shard_rows}) must hold at least one context ({self.context_size})")
        return self

    # ----------------------------------------------------------------- JSON round trip
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HarvestConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def to_json(cfg, path: pathlib.Path) -> None:
    from saelab.store import atomic_write_text

    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


# ------------------------------------------------------------------------ CLI builder
def add_arguments(parser, cls) -> None:
    """Add one flag per dataclass field, help text from the field's metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        hint = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            kw["action"] = "store_true"
        elif origin is list:
            kw.update(action="append", type=args[0], default=None)
        else:
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            kw.update(type=base, default=default)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        if meta.get("required"):
            kw["required"] = True
        elif "default" in kw and kw["default"] not in (None, "", []):
            kw["help"] += f" (default: {kw['default']})"
        parser.add_argument(flag, **kw)


def from_args(cls, ns):
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if v is None and f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        values[f.name] = v
    return cls(**values)
