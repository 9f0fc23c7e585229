"""Pieces every subcommand's parser uses: one-line errors, defaults in the help, argument types.

Nothing here imports torch or numpy at module level: ``distattn --help`` must start instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help; example epilogs printed line by line as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line and exit 2 (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def examples(*lines: str) -> str:
    """An epilog of example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def existing_file(text: str) -> str:
    """A path that must name a readable file (checked before any work starts)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist" if not path.exists() else f"{text} is not a file")
    return text


def tokens(text: str) -> int:
    """``524288``, ``512K`` or ``1M`` tokens (K = 1024)."""
    from ..network import parse_size

    try:
        value = parse_size(text, "--seq-len")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 131072, 128K or 1M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return value


def doc_pool(path: str | None):
    """A document-length sample; documents over 64K repeated 4x as in DistCA's evaluation."""
    if path is None:
        return None
    from ..doclens import load_doc_lens, upsample_long

    return upsample_long(load_doc_lens(path))
