"""MkDocs hook: the reference pages generated from the code at build time, so they cannot drift from it.

- ``reference/config.md``: every key of the run config (``distattn/train/config/sections.py``'s
  dataclasses): type, default, the choices or range the code states, and the field's own comment;
- ``reference/cli.md``: every ``distattn`` command's ``--help``, from its argparse parser.

``tests/test_docs.py`` imports :func:`config_rows` and :func:`cli_commands` to check that nothing is
left out.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import typing
from pathlib import Path

CONFIG_MARK = "<!-- config-keys -->"
CLI_MARK = "<!-- cli-commands -->"
SECTIONS_PY = Path(__file__).resolve().parents[1] / "distattn" / "train" / "config" / "sections.py"


def _comments() -> dict[tuple[str, str], str]:
    """``(class, field) -> its comment``: the ``#`` lines right above the field and the one on its line."""
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


def _choices() -> dict[str, tuple]:
    """The keys that take one of a few words, and the code's tuple of those words."""
    from distattn.train.config import sections as s

    return {"model.dtype": (), "train.dtype": s.DTYPES, "train.on_nonfinite": s.ON_NONFINITE,
            "data.source": s.SOURCES, "data.packing": s.PACKINGS, "data.on_bad_document": s.ON_BAD_DOCUMENT,
            "parallel.scheduler": s.SCHEDULERS, "parallel.cad_backward": (*s.CAD_BACKWARDS, s.AUTO),
            "train.activation_checkpointing": s.CHECKPOINTING, "parallel.dp_mode": ("ddp", "fsdp")}


def _ceilings() -> dict[str, str]:
    from distattn.train.config.validation import CEILINGS

    return {key: f"at most {most:g} ({why})" for key, most, why in CEILINGS}


def _type(hint) -> str:
    text = str(hint).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def config_rows() -> list[tuple[str, str, str, str, str]]:
    """``(section.key, type, default, choices or range, meaning)`` of every config key, in file order."""
    from distattn.train.config.sections import RunConfig

    comments, choices, ceilings = _comments(), _choices(), _ceilings()
    rows = []
    for section in dataclasses.fields(RunConfig):
        cls = section.type if isinstance(section.type, type) else type(getattr(RunConfig(), section.name))
        hints = typing.get_type_hints(cls)
        defaults = getattr(RunConfig(), section.name)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            allowed = choices.get(key)
            bound = ", ".join(allowed) if allowed else ceilings.get(key, "")
            rows.append((key, _type(hints[f.name]), repr(getattr(defaults, f.name)), bound,
                         comments.get((cls.__name__, f.name), "")))
    return rows


def config_table() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | choices / range | meaning |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{k}` | `{cell(t)}` | `{cell(d)}` | {cell(c)} | {cell(m)} |" for k, t, d, c, m in config_rows()]
    return "\n".join(lines)


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
    os.environ["COLUMNS"] = "100"   # the help wraps as it would on a 100-column terminal
    parts = []
    for name, parser in cli_commands():
        parser.prog = name
        parts.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_table())
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_text())
    return markdown
