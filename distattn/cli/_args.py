"""Pieces every subcommand's parser uses: one-line errors, defaults in the help, argument types.

Nothing here imports torch or numpy at module level: ``distattn --help`` must start instantly.
"""

from __future__ import annotations

import argparse
import math
import os
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

    def parse_known_args(self, args=None, namespace=None):
        # argparse gives a `*` positional only the words before the first flag, so `train CONFIG
        # --steps 5 model.dim=64` would leave the override unrecognized: the words left join
        # `overrides` in order (a subcommand that has it); unknown flags stay errors
        namespace, extras = super().parse_known_args(args, namespace)
        if isinstance(getattr(namespace, "overrides", None), list):
            namespace.overrides = [*namespace.overrides, *(word for word in extras if not word.startswith("-"))]
            extras = [word for word in extras if word.startswith("-")]
        return namespace, extras

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def examples(*lines: str) -> str:
    """An epilog of example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def command_group(sub: argparse._SubParsersAction, name: str, **parser_kwargs) -> argparse._SubParsersAction:
    """``distattn NAME SUBCOMMAND``: a subcommand that only holds subcommands (``parser_kwargs``: its help,
    description and epilog). The one given lands in ``args.NAME_command``, which the CLI's error lines
    name (``distattn cluster probe: error: ...``)."""
    group = sub.add_parser(name, **parser_kwargs)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


# the most any int flag takes (ranks, tokens, heads, repeats): a trillion, past every real count, so that
# a typo (10**100) is refused here, not as an OverflowError once numpy or torch forms an int64 product of it
MOST = 2**40


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if value > MOST:
        raise argparse.ArgumentTypeError(f"expected {what} of at most {MOST:,} (2**40), got {text[:40]!r}")
    return value


def _int_list(text: str, low: int | None, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or (low is not None and min(values) < low):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if max(abs(v) for v in values) > MOST:
        raise argparse.ArgumentTypeError(f"expected {what} of at most {MOST:,} (2**40), got {text[:40]!r}")
    return values


def int_list(text: str) -> list[int]:
    return _int_list(text, None, "comma-separated ints")


def positive_int_list(text: str) -> list[int]:
    """``2,4,8``: every entry >= 1 (a zero or negative world size or length cannot run)."""
    return _int_list(text, 1, "comma-separated positive ints")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive int")


def non_negative_int(text: str) -> int:
    """A count that may be zero (e.g. untimed warm-up rounds)."""
    return _int_at_least(text, 0, "an int >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, rates); ``nan`` and ``inf`` are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _check_writable(text: str, folder: bool) -> None:
    """Refuse an output path that could not be written, before the work whose results it holds.

    A folder may not exist yet (it is created with its parents): then the nearest existing
    ancestor must be a writable folder. A file's own folder must already exist.
    """
    path = Path(text)
    if path.exists():
        if folder != path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is {'a file' if folder else 'a folder'}; name "
                                             f"{'a folder' if folder else 'a file'} to write")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise argparse.ArgumentTypeError(f"{text} is not writable; name a path you can write")
        return
    parents = path.absolute().parents
    # a folder is made with its parents, so writing starts in the nearest one that exists
    parent = next(p for p in parents if p.exists()) if folder else parents[0]
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder {parent} does not exist; create it first" if not
                                         parent.exists() else f"{text}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: folder {parent} is not writable; name a path you can write")


def output_file(text: str) -> str:
    """A file written after long work (a profile, a timeline): checked when the command line is read."""
    _check_writable(text, folder=False)
    return text


def output_dir(text: str) -> str:
    """A folder written after long work (created with its parents): checked when the command line is read."""
    _check_writable(text, folder=True)
    return text


def existing_file(text: str) -> str:
    """A path that must name a readable file (checked before any work starts)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist" if not path.exists() else f"{text} is not a file")
    return text


def doclens_argument(text: str) -> str:
    """``--doclens``: a JSON file of document lengths, or a packaged sample's name (``sample``)."""
    from ..planning.doclens import doclens_source

    try:
        doclens_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if Path(text).exists() and not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


DOCLENS_HELP = "a JSON list of document lengths, or `sample` (packaged: 4,000 synthetic lengths, median 2K, 5%% of " \
               "16K-256K); default: a log-normal stand-in"


def existing_path(text: str) -> str:
    """A path that must name an existing file or folder (checked before any work starts)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def tokens(text: str) -> int:
    """``524288``, ``512K`` or ``1M`` tokens (K = 1024)."""
    from ..costmodel.network_csv import parse_size

    try:
        value = parse_size(text, "--seq-len")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 131072, 128K or 1M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return value


# what `distattn simulate` models at most: far past any cluster or context trained today, and small
# enough that a typo (1e12 for 1e6) is a message, not a simulation that never ends
MAX_SEQ_TOKENS = 1 << 30
MAX_GPUS = 1 << 20
MAX_DRAWS = 4096


def sequence_tokens(text: str) -> int:
    """A packed sequence's tokens (:func:`tokens`), at most :data:`MAX_SEQ_TOKENS` (1G)."""
    value = tokens(text)
    if value > MAX_SEQ_TOKENS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SEQ_TOKENS:,} (1G) tokens per sequence are simulated, got "
                                         f"{text!r}")
    return value


def positive_int_at_most(limit: int, what: str):
    """A parser of ints in ``1 .. limit`` (``what``: the unit the message names)."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"at most {limit:,} {what}, got {text!r}")
        return value
    return parse


def doc_pool(path: str | None):
    """A document-length sample; documents over 64K repeated 4x as in DistCA's evaluation."""
    if path is None:
        return None
    from ..planning.doclens import load_doc_lens, upsample_long

    try:
        lens = load_doc_lens(path)
    except ValueError as exc:   # (names the file, not the flag)
        raise ValueError(f"--doclens: {exc}") from None
    return upsample_long(lens)
