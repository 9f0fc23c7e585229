"""`distattn` with a fault planted in one rank, for tests/test_peer_failure.py (the hook lives here, not
in the library: no switch of distattn's own turns a fault on).

    python tests/peer_hooks.py FAULT RANK distattn-args...

FAULT is where rank RANK stops itself (SIGSTOP: stuck) or dies (SIGKILL):

* ``stop-at-start`` / ``kill-at-start``: before the rank joins the process group (under torchrun), or
  before it starts the trainer, which makes the run's groups (local ranks);
* ``kill-in-agreement`` (under torchrun): as the ranks start agreeing which checkpoint to resume;
* ``stop-in-save`` / ``kill-in-save`` (local ranks): as the rank starts writing a checkpoint.

Local ranks are forked from a forkserver that imported distattn itself: the fault travels as the rank
entry (:func:`faulty_entry`, which the launching process names instead of the trainer's own).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

SIGNALS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}


def _self(sig) -> None:
    os.kill(os.getpid(), sig)


def _plant(fault: str, rank: int) -> None:
    """In the process of rank ``rank``: make it stop or die at ``fault``."""
    import torch.distributed as dist

    from distattn.train.checkpoint import dcp

    how, _, where = fault.partition("-")
    sig = SIGNALS[how]
    if where == "at-start" and "RANK" in os.environ:
        _self(sig)
    elif where == "at-start":   # local ranks: in the trainer's start-up, as it makes the run's groups
        from distattn.train import trainer

        real_join = trainer.join_group

        def join_group(cfg):
            time.sleep(0.5)   # a moment into the phase (the word that it began is on its way to the launcher)
            _self(sig)
            return real_join(cfg)
        trainer.join_group = join_group
    elif where == "in-agreement":
        dcp._agreed_checkpoint = lambda *a, **k: _self(sig)
    elif where == "in-save":
        real = dcp._write

        def write(*args, **kwargs):
            if dist.get_rank() == rank:
                _self(sig)
            return real(*args, **kwargs)
        dcp._write = write


def faulty_entry(fault: str, rank: int, cfg, resume, progress: str = "auto", allow_reshape: bool = False):
    """A local rank's entry (``distattn.train.trainer._rank_entry``) with the fault planted."""
    import torch.distributed as dist

    from distattn.train import trainer

    if dist.get_rank() == rank or fault.endswith("in-save"):
        _plant(fault, rank)
    return trainer._rank_entry(cfg, resume, progress, allow_reshape)


def main(argv: list[str]) -> int:
    fault, rank, args = argv[0], int(argv[1]), argv[2:]
    if "RANK" in os.environ:   # torchrun: this process is the rank
        if int(os.environ["RANK"]) == rank:
            _plant(fault, rank)
    else:
        from distattn.train import trainer

        trainer._rank_entry = functools.partial(faulty_entry, fault, rank)
    from distattn.cli import main as distattn

    return distattn(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # the forkserver's ranks import this module
    import peer_hooks   # by its name, so that the ranks unpickle faulty_entry from it

    sys.exit(peer_hooks.main(sys.argv[1:]))
