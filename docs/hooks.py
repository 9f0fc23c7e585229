"""MkDocs hook: the reference pages generated from the code at build time, so they cannot drift from it.

- ``reference/config.md``: every key of the run config (``distattn/train/config/sections.py``'s
  dataclasses, a list of sources such as ``data.blend`` as ``data.blend[i].key``): type, default (as
  YAML), the values the checks allow -- in the words of the checks' own refusals, found by offering
  ``distattn.train.config.validate`` values it should refuse -- and the field's own comment;
- ``reference/cli.md``: every ``distattn`` command's ``--help``, from its argparse parser.

The pages hold a marker (:data:`CONFIG_MARK`, :data:`CLI_MARK`) where the generated text goes, so on
GitHub they still read as a short page saying where the keys are. ``tests/test_docs.py`` imports
:func:`config_rows` and :func:`cli_commands` to check that nothing is left out.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import os
import re
import types
import typing
from pathlib import Path

CONFIG_MARK = "<!-- config-keys -->"
CLI_MARK = "<!-- cli-commands -->"
SECTIONS_PY = Path(__file__).resolve().parents[1] / "distattn" / "train" / "config" / "sections.py"

# Values offered to the checks, per type: below and at zero and one (lower bounds), far above any
# setting (the ceilings), and a word no key takes (the choices). Bools take true or false only.
PROBES: dict[type, tuple] = {int: (-1, 0, 1, 2**40), float: (-1.0, 0.0, 1e12), str: ("?",)}

# What a list field needs beside it to be read at all, so that the checks reach its entries' keys.
LIST_CONTEXT: dict[str, dict] = {"data.blend": {"source": "blend"}}

Row = tuple[str, str, str, str, str]   # (key, type, default, allowed, meaning)


# --- the fields' comments -------------------------------------------------------------------------

@functools.cache   # one parse of sections.py per build
def _comments() -> dict[tuple[str, str], str]:
    """``(class, field) -> its comment``: the ``#`` lines right above the field and the one on its line
    (sections.py documents its keys in comments: a dataclass field has no docstring)."""
    source = SECTIONS_PY.read_text().splitlines()
    out = {}
    for node in ast.parse("\n".join(source)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            line = source[item.lineno - 1]
            above, i = [], item.lineno - 2
            while i >= 0 and source[i].strip().startswith("#"):
                above.insert(0, source[i].strip().lstrip("#").strip())
                i -= 1
            inline = line.split("#", 1)[1].strip() if "#" in line.split("=", 1)[-1] else ""
            out[node.name, item.target.id] = " ".join(filter(None, [*above, inline]))
    return out


def _docstring(cls: type) -> str:
    """``cls``'s docstring on one line, its reST literals as Markdown ones."""
    return " ".join((cls.__doc__ or "").split()).replace("``", "`")


# --- what the checks allow --------------------------------------------------------------------------

def _probe_values(hint) -> list:
    """The :data:`PROBES` of every type the annotation ``hint`` admits."""
    allowed = set(typing.get_args(hint)) or {hint}
    if bool in allowed:
        return []
    return [value for kind, values in PROBES.items() if kind in allowed for value in values]


def _rule(key: str, message: str) -> str | None:
    """The rule a refusal of ``key`` states, without the refused value; None when the message is about
    another key or a combination the key is not the subject of."""
    k = re.escape(key)
    found = re.match(rf"{k} must be (.+?)(?:, got |: {k}=|$)", message, re.S)      # "must be > 0, got -1"
    if found:
        return found.group(1)
    found = re.match(rf"{k} '.*?' is unknown; choose (.+)$", message, re.S)         # "'?' is unknown; choose one of"
    if found:
        return found.group(1)
    found = re.match(rf"{k} \([^)]*\) must (?:be )?(.+?)(?:[:;]|$)", message, re.S)  # against other keys
    if found:   # the parenthesised numbers are this probe's config's values, not the rule
        return re.sub(r" \([^)]*\)", "", found.group(1))
    return None


def _allowed(key: str, hint, config_with) -> str:
    """What the checks allow ``key`` (named ``key`` in their messages), from the refusals of the
    :data:`PROBES` values; ``config_with(value)`` is a config holding ``value`` at the key."""
    from distattn.train.config.validation import validate

    rules: list[str] = []
    for value in _probe_values(hint):
        try:
            validate(config_with(value))
        except ValueError as exc:
            rule = _rule(key, str(exc))
            if rule and rule not in rules:
                rules.append(rule)
    # "at least 3" and "a positive int or auto" say what the range check's "> 0" says, and more
    if any(rule.startswith("at least ") or "positive" in rule for rule in rules):
        rules = [rule for rule in rules if rule not in ("> 0", ">= 0")]
    return " and ".join(rules)


# --- the rows -------------------------------------------------------------------------------------

def _type(hint) -> str:
    """A field's annotation as its YAML value reads: ``int | None``, ``list[BlendSource]``."""
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " | ".join(_type(arg) for arg in args)
    if typing.get_origin(hint) is tuple:   # a YAML list; the config keeps it as a tuple (frozen)
        return f"list[{_type(args[0])}]"
    return getattr(hint, "__name__", str(hint))


def _yaml(value) -> str:
    """``value`` as a config file writes it (``null``, ``true``, ``stdlib``)."""
    import yaml

    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _nested(hint) -> type | None:
    """The dataclass a list-valued field holds (``data.blend``'s ``BlendSource``), else None."""
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
        inner = _nested(arg)
        if inner is not None:
            return inner
    return None


def _section_rows(section: str) -> list[Row]:
    """The rows of one section (``model``, ...), each list field's entry keys after it."""
    from distattn.train.config.sections import RunConfig

    base, comments = RunConfig(), _comments()
    defaults = getattr(base, section)
    cls = type(defaults)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        allowed = _allowed(key, hints[f.name], lambda value, name=f.name: base.replace(**{section: {name: value}}))
        rows.append((key, _type(hints[f.name]), _yaml(getattr(defaults, f.name)), allowed,
                     comments.get((cls.__name__, f.name), "")))
        inner = _nested(hints[f.name])
        if inner is not None:
            rows += _list_rows(section, f.name, inner)
    return rows


def _list_rows(section: str, name: str, cls: type) -> list[Row]:
    """The keys of each entry of a list field, ``section.name[i].key``; each entry is checked as the
    first of a list (the checks name it ``[0]``). A key with no comment of its own says what the
    section's key of the same name says, else what its class's docstring says."""
    from distattn.train.config.sections import RunConfig

    base, comments = RunConfig(), _comments()
    parent = type(getattr(base, section))
    hints, entry = typing.get_type_hints(cls), {f.name: f.default for f in dataclasses.fields(cls)}
    context = LIST_CONTEXT.get(f"{section}.{name}", {})
    rows = []
    for f in dataclasses.fields(cls):
        def config_with(value, field=f.name):
            return base.replace(**{section: {**context, name: [{**entry, field: value}]}})

        allowed = _allowed(f"{section}.{name}[0].{f.name}", hints[f.name], config_with)
        meaning = comments.get((cls.__name__, f.name)) or (
            f"as `{section}.{f.name}`, for this entry" if (parent.__name__, f.name) in comments else _docstring(cls))
        rows.append((f"{section}.{name}[i].{f.name}", _type(hints[f.name]), _yaml(f.default), allowed, meaning))
    return rows


def config_rows() -> list[Row]:
    """``(key, type, default, allowed, meaning)`` of every config key, section by section in file order."""
    from distattn.train.config.sections import RunConfig

    return [row for section in dataclasses.fields(RunConfig) for row in _section_rows(section.name)]


def _cell(text: str) -> str:
    """Plain text in a table cell: a bare pipe would end the cell (one in a code span would not, and
    there a backslash would show)."""
    return text.replace("|", "\\|")


def config_table() -> str:
    """One table per section, under a heading the page's contents list."""
    from distattn.train.config.sections import RunConfig

    rows = config_rows()
    parts = []
    for section in dataclasses.fields(RunConfig):
        lines = [f"## `{section.name}`", "", "| key | type | default | allowed | meaning |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{k}` | `{t}` | `{d}` | {_cell(a)} | {_cell(m)} |"
                  for k, t, d, a, m in rows if k.startswith(f"{section.name}.")]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# --- the command line -----------------------------------------------------------------------------

def cli_commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ("distattn",)
                 ) -> list[tuple[str, argparse.ArgumentParser]]:
    """``("distattn train", its parser)`` of every command, the leaves of the subcommand tree included."""
    if parser is None:
        from distattn.cli import build_parser

        parser = build_parser()
    found = [(" ".join(path), parser)]
    for action in parser._actions:   # (argparse has no public walk of its subparsers)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += cli_commands(sub, (*path, name))
    return found


def cli_text() -> str:
    """Each command's ``--help`` under its own heading, wrapped as on a 100-column terminal."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"   # argparse reads the width when it formats
    try:
        parts = []
        for name, parser in cli_commands():
            parser.prog = name
            parts.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_table())
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_text())
    return markdown
