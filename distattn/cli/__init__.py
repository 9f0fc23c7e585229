"""The ``distattn`` command line (``distattn --help``; ``python -m distattn.cli`` under launchers).

Building the parser imports neither torch nor numpy: ``--help``, ``--version`` and
``cluster nccl-parse`` start at once, and each subcommand imports what it runs. Errors a user
can fix -- a bad value, a missing file, a config that cannot run -- are one line on stderr and
exit code 2, printed before any rank starts; Ctrl-C exits 130 and SIGTERM 143, without a
traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..distributed.spawn import Terminated
from . import ckpt_cmds, cluster_cmds, data_cmds, perf_cmds, run_cmds, sim_cmds
from ._args import Parser, examples


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="distattn", description="Exact context-parallel attention for long-context training: "
                    "run the schedulers, train, launch jobs, measure networks, benchmark and simulate.",
                    epilog=examples(".venv/bin/distattn train configs/tiny.yaml",
                                    ".venv/bin/distattn demo --world-size 4",
                                    ".venv/bin/distattn data prepare corpus.jsonl --out data/corpus",
                                    ".venv/bin/distattn SUBCOMMAND --help"))
    parser.add_argument("--version", action="version", version=f"distattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    run_cmds.add_parsers(sub)
    cluster_cmds.add_parsers(sub)
    data_cmds.add_parsers(sub)
    ckpt_cmds.add_parsers(sub)
    perf_cmds.add_parsers(sub)
    sim_cmds.add_parsers(sub)
    _add_logging(parser)
    return parser


def _add_logging(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-ranks`` on every command (the leaves of the subcommand tree)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if actions:
        for child in actions[0].choices.values():
            _add_logging(child)
        return
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the least severe of distattn's messages shown")
    parser.add_argument("--log-ranks", default="0", choices=["0", "all"],
                        help="whose messages: rank 0's, or every rank's prefixed [rank N]")


class _Stopped(BaseException):   # not an Exception: no `except Exception` swallows it
    """SIGTERM before a subcommand took the signal over (the trainer's ranks do once they start)."""


def _stop(signum, frame):
    raise _Stopped


# the commands that start ranks: they import torch before anything else they do
_STARTS_RANKS = ("train", "launch", "demo", "bench")


def _import_torch_holding_signals() -> None:
    """Import numpy and torch with SIGTERM and SIGINT held. torch's start-up catches an exception raised
    inside numpy's import (what :func:`_stop` raises), which loses the signal (a run that never stops)
    or leaves numpy half imported; held, a signal that came meanwhile is delivered on release, here."""
    held = {signal.SIGTERM, signal.SIGINT}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, [args.command, getattr(args, "cluster_command", None),
                                  getattr(args, "data_command", None), getattr(args, "ckpt_command", None)]))
    from ..distributed.log import configure_logging

    configure_logging(args.log_level, args.log_ranks)
    try:
        if args.command in _STARTS_RANKS and threading.current_thread() is threading.main_thread():
            _import_torch_holding_signals()
        return _stopping(args.func(args))
    except ValueError as exc:
        print(f"distattn {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distattn {name}: interrupted", file=sys.stderr)
        return _stopping(130)
    except Terminated as exc:   # a signal the ranks were told of
        print(f"distattn {name}: {exc}", file=sys.stderr)
        return _stopping(exc.exit_code)
    except _Stopped:
        print(f"distattn {name}: stopped by SIGTERM" + (" before any rank started; nothing was saved"
                                                        if args.command == "train" else ""), file=sys.stderr)
        return _stopping(128 + signal.SIGTERM)


def _stopping(code: int) -> int:
    """``code``; when a signal stopped the command (130, 143), later ones are ignored from here on:
    Python's shutdown resets handled signals to their default, so a Ctrl-C pressed again while the
    process exits would turn exit code 130 into death by SIGINT."""
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
