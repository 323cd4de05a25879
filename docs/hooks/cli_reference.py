"""mkdocs hook: the CLI reference, rendered from the argument parser at build time.

A page holds the line ``<!-- cli-reference -->``; the hook replaces it with one section per
subcommand of ``saelab.cli.build_parser()``: its summary, description, usage and a table of its
flags (names, default, help). The page therefore says what ``saelab CMD --help`` says, never more
or less, and needs no editing when a flag changes.

``<!-- config-fields: saelab.config.TrainConfig -->`` becomes a table of that dataclass's fields
(name, default, flag, help), read from the fields' ``metadata["help"]``, where the CLI's help
comes from too.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import re

MARKER = "<!-- cli-reference -->"
CONFIG_MARKER = re.compile(r"^<!--\s*config-fields:\s*([\w.]+)\s*-->[ \t]*$", re.M)
USAGE_WIDTH = 96


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_cli())
    return CONFIG_MARKER.sub(lambda m: render_config_fields(m.group(1)), markdown)


def render_cli(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for every subcommand of ``parser`` (default: ``saelab.cli.build_parser()``)."""
    if parser is None:
        from saelab.cli import build_parser

        parser = build_parser()
    out = [_options_table(parser, "Flags of `saelab` itself (before the subcommand):")]
    for name, summary, sub in _subcommands(parser):
        out.append(_render_command(f"{parser.prog} {name}", summary, sub, level=2))
    return "\n\n".join(part for part in out if part)


def render_config_fields(dotted: str) -> str:
    """A table of the fields of the dataclass ``dotted`` (``module.Class``)."""
    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata or {}
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        flag = "" if meta.get("cli") is False else "`" + (meta.get("flag") or "--" + f.name.replace("_", "-")) + "`"
        shown = "" if default in (None, "", []) else f"`{default!r}`" if isinstance(default, str) else f"`{default}`"
        what = md_text(str(meta.get("help") or "").replace("%%", "%"))  # argparse-escaped percent signs
        if meta.get("required"):
            what += " (required)"
        rows.append(f"| `{f.name}` | {shown} | {flag} | {what} |")
    return "| field | default | flag | what it is |\n|---|---|---|---|\n" + "\n".join(rows)


def _subcommands(parser: argparse.ArgumentParser):
    """(name, one-line help, subparser) in the order the parser defines them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a subcommand already listed
                    continue
                seen.add(id(sub))
                yield name, helps.get(name, ""), sub


def _render_command(title: str, summary: str, sub: argparse.ArgumentParser, level: int) -> str:
    parts = [f"{'#' * level} `{title}`"]
    if summary:
        parts.append(md_text(_sentence(summary)))
    if sub.description and sub.description.strip() != (summary or "").strip():
        parts.append(md_text(sub.description))
    parts.append("```text\n" + _usage(sub) + "\n```")
    table = _options_table(sub)
    if table:
        parts.append(table)
    if sub.epilog:
        parts.append(md_text(sub.epilog))
    for name, child_summary, child in _subcommands(sub):
        parts.append(_render_command(f"{title} {name}", child_summary, child, level + 1))
    return "\n\n".join(parts)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _options_table(parser: argparse.ArgumentParser, heading: str = "") -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    required_groups = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction,
                                                                    argparse._SubParsersAction)):
            continue
        names = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            names += " " + _metavar(formatter, action)
        notes = []
        if action.required or not action.option_strings:
            notes.append("required")
        elif id(action) in required_groups:
            notes.append("one of a required group")
        if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
            notes.append("repeatable")
        if action.choices is not None and action.metavar is not None and not isinstance(action.choices, dict):
            notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))  # a metavar hides them
        help_text = formatter._expand_help(action) if action.help else ""
        default = _default(action)
        if default:  # the column shows it: drop the help's own "(default: X)" when it says the same
            m = _DEFAULT_SUFFIX.search(help_text)
            if m and f"`{m.group(1).strip()}`" == default:
                help_text = help_text[:m.start()]
        what = md_text(help_text)
        if notes:
            what = (what + " " if what else "") + "(" + "; ".join(notes) + ")"
        rows.append(f"| `{names}` | {default} | {what} |")
    if not rows:
        return ""
    table = "| flag | default | what it does |\n|---|---|---|\n" + "\n".join(rows)
    return (heading + "\n\n" + table) if heading else table


def _metavar(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    return formatter._format_args(action, formatter._get_default_metavar_for_optional(action))


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction,
                           argparse._CountAction)) or action.nargs == 0:
        return ""
    default = action.default
    if default is None or default == argparse.SUPPRESS or default in ([], "") or default is False:
        return ""
    if isinstance(default, (list, tuple)):
        default = ",".join(str(d) for d in default)
    return f"`{default}`"


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?", ")")) else ".")


_DEFAULT_SUFFIX = re.compile(r"\s*\(default: ([^()]*)\)\s*$")
_CODE = re.compile(r"(`[^`]*`)")
_SPECIAL = re.compile(r"([\\*_\[\]|#])")


def md_text(text: str) -> str:
    """``text`` for a markdown table cell or paragraph: literal everywhere outside backtick code
    spans (HTML escaped, markdown's emphasis and link characters escaped), code spans kept."""
    out = []
    for piece in _CODE.split(" ".join(text.split())):
        if piece.startswith("`") and piece.endswith("`") and len(piece) > 1:
            out.append(piece)  # a pipe inside a code span does not split a table cell
        else:
            out.append(_SPECIAL.sub(r"\\\1", html.escape(piece, quote=False)))
    return "".join(out)
