"""The ``distattn`` command line (``distattn --help``; ``python -m distattn.cli`` under launchers).

Building the parser imports neither torch nor numpy: ``--help``, ``--version`` and
``cluster nccl-parse`` start at once, and each subcommand imports what it runs. Errors a user
can fix -- a bad value, a missing file, a config that cannot run -- are one line on stderr and
exit code 2, printed before any rank starts; Ctrl-C exits 130 and SIGTERM 143, without a
traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import cluster_cmds, data_cmds, perf_cmds, run_cmds
from ._args import Parser, examples


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="distattn", description="Exact context-parallel attention for long-context training: "
                    "run the schedulers, train, launch jobs, measure networks, benchmark and simulate.",
                    epilog=examples("distattn train configs/tiny.yaml", "distattn demo --world-size 4",
                                    "distattn data prepare corpus.jsonl --out data/corpus",
                                    "distattn SUBCOMMAND --help"))
    parser.add_argument("--version", action="version", version=f"distattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    run_cmds.add_parsers(sub)
    cluster_cmds.add_parsers(sub)
    data_cmds.add_parsers(sub)
    perf_cmds.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, [args.command, getattr(args, "cluster_command", None),
                                  getattr(args, "data_command", None)]))
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"distattn {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distattn {name}: interrupted", file=sys.stderr)
        return 130
