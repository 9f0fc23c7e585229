"""Run a function on N local gloo processes: the harness for multi-rank tests, demos and benchmarks.

    from distattn.spawn import run_distributed
    results = run_distributed(my_fn, 4, arg1, arg2, timeout=120)   # [rank 0's return, rank 1's, ...]

``my_fn(*args, **kwargs)`` runs in every process after
``torch.distributed.init_process_group("gloo")`` (file:// rendezvous, so no
ports clash) and may use ``torch.distributed.group.WORLD``. It must be
importable by name (a module-level function). A rank that raises makes
``run_distributed`` raise :class:`RankError` with that rank's traceback; a
rank that dies or does not finish within ``timeout`` seconds ends every rank
and raises too. Collectives time out after ``collective_timeout`` seconds, so
a rank stuck in a collective fails instead of hanging.

Signals: no rank outlives the caller (each rank watches a pipe whose only writer is the caller
and kills itself when the pipe closes -- the caller's death closes it, whatever the signal --
and the caller kills what is left on every way out). Ctrl-C (SIGINT) stops every rank
at once and raises ``KeyboardInterrupt`` in the caller. SIGTERM -- how Slurm and most schedulers
preempt -- is passed on to every rank, which may handle it (the trainer saves a checkpoint at
the next step boundary); the caller then waits up to ``term_grace`` seconds for the ranks to
finish and raises :class:`Terminated`. The same holds when SIGTERM reaches the whole process group
at once (Slurm signals every process of a step): the forkserver ignores it.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


class Terminated(RuntimeError):
    """The caller got SIGTERM; the ranks were told and have finished or been killed.
    ``results`` holds each rank's return value when every rank finished in time, else None."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = results


class RankError(RuntimeError):
    """A rank failed; ``rank`` and the remote ``traceback`` text are attached."""

    def __init__(self, rank: int, message: str, remote_traceback: str = ""):
        super().__init__(f"rank {rank}: {message}" + (f"\n--- traceback of rank {rank} ---\n{remote_traceback}"
                                                       if remote_traceback else ""))
        self.rank = rank
        self.remote_traceback = remote_traceback


def _context():
    ctx = mp.get_context("forkserver")
    # Children fork from a server that has already imported torch: starting a
    # rank then costs milliseconds instead of a fresh interpreter's seconds.
    # distattn._forkserver makes the server outlive a SIGTERM sent to the whole process group
    ctx.set_forkserver_preload(["torch", "torch.distributed", "distattn", "distattn._forkserver"])
    return ctx


def _die_with_caller(lifeline) -> None:
    """Kill this rank when the caller is gone. A rank's parent is the forkserver, not the caller,
    and the forkserver lives as long as any of its children: only the caller's own pipe end tells."""

    def watch():
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="distattn-lifeline").start()


def _worker(fn, args, kwargs, rank, world_size, init_file, collective_timeout, threads, backend, results, lifeline):
    import torch
    import torch.distributed as dist

    _die_with_caller(lifeline)
    # Ctrl-C reaches the whole terminal process group: the caller alone decides, ranks do not
    # print a traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the forkserver ignores it (distattn._forkserver)
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout))
        out = fn(*args, **kwargs)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as exc:  # report everything, including KeyboardInterrupt in a rank
        results.put((rank, "error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0,
                    collective_timeout: float = 60.0, threads_per_rank: int = 1, backend: str = "gloo",
                    term_grace: float = 120.0, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result.
    ``backend="nccl"`` runs one rank per GPU instead (rank ``i`` on ``cuda:i``).

    Raises :class:`RankError` if a rank raises or dies, :class:`TimeoutError` if not all
    ranks finish within ``timeout`` seconds, :class:`Terminated` after a SIGTERM (see the module
    docstring; ``term_grace`` seconds for the ranks to finish). Every process is gone when this
    returns.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0 or collective_timeout <= 0:
        raise ValueError("timeout and collective_timeout must be positive seconds")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = _context()
    results = ctx.Queue()
    lifeline, keep_alive = ctx.Pipe(duplex=False)   # this process holds the only writing end
    with tempfile.TemporaryDirectory(prefix="distattn-spawn-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, args, kwargs, rank, world_size, init_file, collective_timeout,
                                   threads_per_rank, backend, results, lifeline))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        lifeline.close()
        term = _TermForwarder(procs)
        try:
            collected = _collect(procs, results, world_size, timeout, term, term_grace)
            if term.received:
                raise Terminated("stopped by SIGTERM", collected)
            return collected
        finally:
            term.restore()
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
            keep_alive.close()


class _TermForwarder:
    """While installed (main thread only), SIGTERM to the caller is passed on to every rank."""

    def __init__(self, procs):
        self.procs, self.received = procs, None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._forward)

    def _forward(self, signum, frame):
        self.received = self.received or time.monotonic()
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _get(results, timeout: float):
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        return None


def _collect(procs, results, world_size: int, timeout: float, term: _TermForwarder,
             term_grace: float) -> list[Any]:
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(done) < world_size:
        msg = _get(results, 0.2)
        if msg is not None and msg[1] == "ok":
            done[msg[0]] = pickle.loads(msg[2])
            continue
        crashed = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
        if term.received and (msg is not None or crashed or time.monotonic() > term.received + term_grace):
            # ranks that let SIGTERM end them are not failures: the caller asked for it
            missing = sorted(set(range(world_size)) - set(done))
            raise Terminated(f"stopped by SIGTERM; ranks {missing} did not finish within {term_grace:.0f} s")
        if msg is not None or crashed:
            raise _first_failure(procs, results, done, msg)
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(done))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (killed)")
    return [done[r] for r in range(world_size)]


def _first_failure(procs, results, done, msg, grace: float = 2.0) -> RankError:
    """Pick the root cause once something failed: a rank that died without reporting
    (a crash) explains the errors its peers then raise, so it wins over them."""
    errors = [msg] if msg is not None else []
    end = time.monotonic() + grace
    while time.monotonic() < end:
        extra = _get(results, 0.1)
        if extra is not None and extra[1] != "ok":
            errors.append(extra)
        elif extra is not None:
            done[extra[0]] = None
        reported = {e[0] for e in errors} | set(done)
        crashed = [r for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
        if crashed:
            others = "; ".join(f"rank {e[0]}: {e[2]}" for e in errors)
            note = f" (then {others})" if others else ""
            return RankError(crashed[0], f"process exited with code {procs[crashed[0]].exitcode} without a "
                                         f"result{note}")
        if errors and all(p.exitcode is not None for p in procs):
            break
    return RankError(errors[0][0], errors[0][2], errors[0][3])
