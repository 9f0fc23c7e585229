"""distattn's messages go through :mod:`logging`, under the ``distattn`` logger hierarchy.

Library code never prints: it logs to ``logging.getLogger(__name__)`` (``distattn.train.trainer``,
``distattn.train.checkpoint.dcp``, ...). Until someone configures it, Python shows only warnings and
errors of those loggers. The CLI configures it (``--log-level``, ``--log-ranks``); code that embeds
distattn calls :func:`configure_logging` itself, or routes the ``distattn`` logger like any other::

    import distattn
    distattn.configure_logging("INFO", ranks="all")    # [rank 3] resuming from step_20, ...
    logging.getLogger("distattn").setLevel(logging.ERROR)   # or silence it

With ``ranks="0"`` (the default) only rank 0's records are shown, unprefixed; ``ranks="all"``
shows every rank's, each line prefixed ``[rank N]``. The rank is the process group's, else the
launcher's ``RANK``, else 0. Ranks started by :func:`distattn.distributed.spawn.run_distributed` get the
caller's settings (:func:`settings`). The per-step progress line of ``distattn train`` is the
console's, not a log record, whatever the level; an embedded ``Trainer``'s is a record at INFO off a
terminal (its ``progress``), so the level set here decides.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

ROOT = "distattn"
RANKS = ("0", "all")


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")   # not imported for it: a CLI that never loads torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class _RankFilter(logging.Filter):
    """Keeps rank 0's records (``ranks="0"``) or every rank's with a ``[rank N] `` prefix (``"all"``)."""

    def __init__(self, ranks: str):
        super().__init__()
        self.ranks = ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        record.rank_prefix = f"[rank {rank}] " if self.ranks == "all" else ""
        return self.ranks == "all" or rank == 0


class _Handler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (found again, and replaced, by its type). Given
    ``"stdout"``/``"stderr"`` it writes to whatever ``sys.stdout``/``sys.stderr`` is at each record
    (a test's capture, a redirect made later), else to the stream it was given."""

    def __init__(self, stream):
        self.target = stream
        super().__init__(None if isinstance(stream, str) else stream)

    @property
    def stream(self):
        return getattr(sys, self.target) if isinstance(self.target, str) else self.target

    @stream.setter
    def stream(self, value):   # StreamHandler.__init__ and setStream assign it
        if value is not None and not isinstance(self.target, str):
            self.target = value


def configure_logging(level: int | str = "INFO", ranks: str = "0", stream=None) -> None:
    """Show the ``distattn`` loggers' records of ``level`` and above on ``stream`` (a file object, or
    ``"stdout"``/``"stderr"``: the default is stdout), from rank 0 only or from every rank with a rank
    prefix. Calling it again replaces the settings."""
    if ranks not in RANKS:
        raise ValueError(f"ranks must be '0' (rank 0 only) or 'all' (every rank, prefixed), got {ranks!r}")
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"level must be one of debug, info, warning, error, got {level!r}")
        level = logging.getLevelName(name)
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    handler = _Handler(stream if stream is not None else "stdout")
    handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
    handler.addFilter(_RankFilter(ranks))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False   # one copy of each line, whatever the root logger does


def settings() -> dict[str, Any] | None:
    """What :func:`configure_logging` was last given in this process (None: not called), for ranks
    started in other processes to repeat."""
    logger = logging.getLogger(ROOT)
    ours = [h for h in logger.handlers if isinstance(h, _Handler)]
    if not ours:
        return None
    ranks = next(f.ranks for f in ours[0].filters if isinstance(f, _RankFilter))
    target = ours[0].target
    return {"level": logger.level, "ranks": ranks,
            "stream": target if isinstance(target, str) else "stderr" if target is sys.stderr else "stdout"}


def apply(saved: dict[str, Any] | None) -> None:
    """Repeat :func:`settings` from another process here (a no-op for None)."""
    if saved is not None:
        configure_logging(saved["level"], saved["ranks"], saved["stream"])
