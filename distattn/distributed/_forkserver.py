"""Imported by :mod:`distattn.distributed.spawn`'s forkserver only (its preload list), never by a caller.

Slurm (time limit, ``scancel``, preemption) and ``timeout`` signal every process of a job step,
not only the one they started. The forkserver dying of that SIGTERM would make every rank's exit
code unreadable (the caller then sees each rank as a crash) while the ranks are still saving their
checkpoint; ignoring it there keeps the server up. Ranks fork from the server and restore the
default at start (:func:`distattn.distributed.spawn._worker`), so SIGTERM still reaches their own handlers.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # Slurm's --signal warning: the same
