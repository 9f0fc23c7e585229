"""Run a function on N local gloo processes: the harness for multi-rank tests, demos and benchmarks.

    from distattn.distributed.spawn import run_distributed
    results = run_distributed(my_fn, 4, arg1, arg2, timeout=120)   # [rank 0's return, rank 1's, ...]

``my_fn(*args, **kwargs)`` runs in every process after
``torch.distributed.init_process_group("gloo")`` (file:// rendezvous, so no
ports clash) and may use ``torch.distributed.group.WORLD``. It must be
importable by name (a module-level function). A rank that raises makes
``run_distributed`` raise :class:`RankError` with that rank's traceback; a
rank that dies or does not finish within ``timeout`` seconds ends every rank
and raises too. The error also says which ranks died, which stayed silent (stuck)
and the phase each said it was in (:func:`distattn.distributed.phases.note_phase`): a peer's failure named.
Collectives time out after ``collective_timeout`` seconds, so
a rank stuck in a collective fails instead of hanging.

Signals: no rank outlives the caller (each rank watches a pipe whose only writer is the caller
and kills itself when the pipe closes -- the caller's death closes it, whatever the signal --
and the caller kills what is left on every way out). SIGTERM -- how Slurm and most schedulers
preempt -- and a first Ctrl-C (SIGINT) are passed on to every rank as SIGTERM, which may handle it
(the trainer saves a checkpoint at the next step boundary); a rank that has not installed a handler
yet stops with :class:`Terminated`. The caller sends it again every second until the ranks are done
-- a rank starts with SIGTERM ignored, inherited from the forkserver, until its handler is in place
-- then waits up to ``term_grace`` seconds for them and raises :class:`Terminated`. A second Ctrl-C
kills every rank at once and raises ``KeyboardInterrupt``. The same holds when the signal reaches
the whole process group at once (Slurm signals every process of a step): the forkserver ignores it.
SIGUSR1 (Slurm's warning before the time limit, ``#SBATCH --signal=USR1@SECONDS``) travels the same
way as itself; :class:`Terminated` then carries it and its :attr:`~Terminated.exit_code` is 0.
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

from . import log
from . import phases as phase_notes


class Terminated(RuntimeError):
    """The caller got SIGTERM (or SIGINT: ``signum``); the ranks were told and have finished or been
    killed. ``results`` holds each rank's return value when every rank finished in time, else None."""

    def __init__(self, message: str, results: list | None = None, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.results, self.signum = results, signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by ``signum``: 143 for SIGTERM, 130 for SIGINT; 0 for
        SIGUSR1, Slurm's warning before the time limit: the stop was asked for, and a failure's code
        would make torchrun restart the workers (``--max-restarts``) and Slurm call the job FAILED."""
        return 0 if self.signum == signal.SIGUSR1 else 128 + self.signum


def _stop_rank(signum, frame):
    """A rank's SIGTERM/SIGUSR1 handler until its function installs its own: stop, reported as an error."""
    raise Terminated(f"stopped by {signal.Signals(signum).name} before it was ready to handle it", None, signum)


class RankError(RuntimeError):
    """A rank failed; ``rank`` and the remote ``traceback`` text are attached, and what the caller saw of
    the others: ``original`` (the reporting rank's exception, when it pickles), ``crashed`` (rank ->
    exit code of ranks that died without a result), ``silent`` (ranks still alive that had not
    reported: stuck, when a peer's error was a timeout) and ``phases`` (rank -> (phase, path) it was in,
    :func:`distattn.distributed.phases.note_phase`)."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "", original: BaseException | None = None,
                 crashed: dict[int, int] | None = None, silent: list[int] | None = None,
                 phases: dict[int, tuple[str, str]] | None = None):
        super().__init__(f"rank {rank}: {message}" + (f"\n--- traceback of rank {rank} ---\n{remote_traceback}"
                                                       if remote_traceback else ""))
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.original, self.crashed, self.silent = original, crashed or {}, silent or []
        self.phases = phases or {}


def _portable(exc: BaseException) -> bytes | None:
    """``exc`` pickled for the caller (who then tells, e.g., a peer's failure by its type), or None."""
    try:
        blob = pickle.dumps(exc)
    except Exception:   # an exception holding what does not pickle: the text alone travels
        return None
    return blob if len(blob) < 1 << 16 else None


def _unpickled(msg) -> BaseException | None:
    try:
        return pickle.loads(msg[4]) if len(msg) > 4 and msg[4] is not None else None
    except Exception:   # a class the caller cannot rebuild: the text alone
        return None


def _context():
    import torch.multiprocessing as mp   # here, so that importing this module (the CLI's errors) needs no torch

    ctx = mp.get_context("forkserver")
    # Children fork from a server that has already imported torch: starting a
    # rank then costs milliseconds instead of a fresh interpreter's seconds.
    # distattn.distributed._forkserver makes the server outlive a SIGTERM sent to the whole process group
    # (first, so a signal to the process group while the server imports torch does not kill it).
    # torch._dynamo too: attention's custom ops import it, and it is most of what a rank would import
    # (seconds of CPU per rank, so per run of N ranks). Only torch's modules and distattn's lazy package:
    # a rank imports the rest of distattn itself (a rank may still load its own copy of a module first).
    ctx.set_forkserver_preload(["distattn.distributed._forkserver", "torch", "torch.distributed", "torch._dynamo",
                                "distattn"])
    _tracker_ignores_usr1()
    return ctx


def _tracker_ignores_usr1() -> None:
    """multiprocessing's resource tracker (the caller's child) ignores SIGTERM and SIGINT, but SIGUSR1,
    which Slurm sends every process of a step, would kill it; it keeps an ignored signal across its
    exec, so it starts with SIGUSR1 ignored (one that comes meanwhile is lost: milliseconds)."""
    if threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import resource_tracker

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGUSR1, previous)


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


def _worker(fn, args, kwargs, rank, world_size, init_file, collective_timeout, threads, backend, results, lifeline,
            log_settings):
    import torch
    import torch.distributed as dist

    _die_with_caller(lifeline)

    def tell(phase, path):
        results.put((rank, "phase", phase, path))
    phase_notes.channel = tell
    # Ctrl-C reaches the whole terminal process group: the caller alone decides, ranks do not
    # print a traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGUSR1):   # the forkserver ignores them (distattn.distributed._forkserver)
        signal.signal(sig, _stop_rank)
    torch.set_num_threads(threads)
    log.apply(log_settings)   # the caller's distattn logging (a forked rank does not inherit it)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        from .comm import peer_phase

        # a rank that never joins (or dies joining) is named in one line (PeerFailed), not gloo's text
        with peer_phase("start-up", f"{world_size} local ranks", collective_timeout):
            dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=collective_timeout))
            if backend == "gloo":
                # gloo connects its full mesh eagerly; a rank whose fn returns at once would otherwise exit
                # and close a socket a slower peer is still handshaking on ("Connection closed by peer")
                dist.barrier()
        out = fn(*args, **kwargs)
        _ignore_stops()   # done: the caller's repeats must not lose the result
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as exc:  # report everything, including KeyboardInterrupt in a rank
        _ignore_stops()
        results.put((rank, "error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), _portable(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ignore_stops() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


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
        logging_ = log.settings()
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, args, kwargs, rank, world_size, init_file, collective_timeout,
                                   threads_per_rank, backend, results, lifeline, logging_))
                 for rank in range(world_size)]
        term = _TermForwarder(procs)   # before the first start: a signal from now on reaches every rank
        try:
            for p in procs:
                try:
                    p.start()
                except Exception:   # the forkserver died of the signal before it could ignore it
                    if term.received:
                        raise Terminated(f"stopped by {term.name} while starting the ranks", None,
                                         term.signum) from None
                    raise
                term.forward()   # one started after the signal missed it
            lifeline.close()
            collected = _collect(procs, results, world_size, timeout, term, term_grace)
            if term.received:
                raise Terminated(f"stopped by {term.name}", collected, term.signum)
            return collected
        finally:
            term.restore()
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                if p.pid is not None:   # started (a failed start must not hide its error behind join's)
                    p.join(timeout=10)
            keep_alive.close()


class _TermForwarder:
    """While installed (main thread only), SIGTERM or a first SIGINT to the caller is passed on to
    every started rank as SIGTERM, SIGUSR1 (Slurm's time-limit warning) as SIGUSR1, and :meth:`forward`
    passes it on again (``_collect`` calls it every second); a second SIGINT raises ``KeyboardInterrupt``."""

    def __init__(self, procs):
        self.procs, self.received, self.signum, self.sent = procs, None, None, 0.0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                self.previous[sig] = signal.signal(sig, self._note)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def _note(self, signum, frame):
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt   # Ctrl-C while the ranks are already stopping: stop now
        self.received = self.received or time.monotonic()
        self.signum = self.signum or signum
        self.forward()

    def forward(self, every: float = 0.0) -> None:
        """Send SIGTERM (SIGUSR1 for a SIGUSR1) to every live rank, if a signal came and ``every`` seconds
        passed since the last."""
        if not self.received or time.monotonic() - self.sent < every:
            return
        self.sent = time.monotonic()
        sig = signal.SIGUSR1 if self.signum == signal.SIGUSR1 else signal.SIGTERM
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def restore(self):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


def _get(results, timeout: float):
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        return None


def _collect(procs, results, world_size: int, timeout: float, term: _TermForwarder,
             term_grace: float) -> list[Any]:
    done: dict[int, Any] = {}
    phases: dict[int, tuple[str, str] | None] = {}
    deadline = time.monotonic() + timeout
    while len(done) < world_size:
        term.forward(every=1.0)
        msg = _get(results, 0.2)
        if msg is not None and msg[1] == "phase":
            phases[msg[0]] = None if msg[2] is None else (msg[2], msg[3])
            continue
        if msg is not None and msg[1] == "ok":
            done[msg[0]] = pickle.loads(msg[2])
            continue
        crashed = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
        if term.received and (msg is not None or crashed or time.monotonic() > term.received + term_grace):
            # ranks that the signal ended are not failures: the caller asked for it
            missing = sorted(set(range(world_size)) - set(done))
            late = time.monotonic() > term.received + term_grace
            raise Terminated(f"stopped by {term.name}" + (f"; ranks {missing} did not finish within "
                                                          f"{term_grace:.0f} s" if late else ""), None, term.signum)
        if msg is not None or crashed:
            raise _first_failure(procs, results, done, msg, phases)
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(done))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (killed)")
    return [done[r] for r in range(world_size)]


def _first_failure(procs, results, done, msg, phases: dict, grace: float = 2.0) -> RankError:
    """Pick the root cause once something failed: a rank that died without reporting
    (a crash) explains the errors its peers then raise, so it wins over them. Ranks still alive
    and silent after ``grace`` seconds are named too (a stuck rank explains its peers' timeouts), and
    the phase each rank said it was in (:func:`distattn.distributed.phases.note_phase`)."""
    errors = [msg] if msg is not None else []
    end = time.monotonic() + grace
    while time.monotonic() < end:
        extra = _get(results, 0.1)
        if extra is not None and extra[1] == "phase":
            phases[extra[0]] = None if extra[2] is None else (extra[2], extra[3])
        elif extra is not None and extra[1] != "ok":
            errors.append(extra)
        elif extra is not None:
            done[extra[0]] = None
        reported = {e[0] for e in errors} | set(done)
        crashed = {r: p.exitcode for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)}
        if crashed:
            first = min(crashed)
            others = "; ".join(f"rank {e[0]}: {e[2]}" for e in errors)
            note = f" (then {others})" if others else ""
            return RankError(first, f"process exited with code {crashed[first]} without a result{note}",
                             original=_unpickled(errors[0]) if errors else None, crashed=crashed,
                             phases={r: p for r, p in phases.items() if p is not None})
        if errors and all(p.exitcode is not None for p in procs):
            break
    reported = {e[0] for e in errors} | set(done)
    silent = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is None]
    return RankError(errors[0][0], errors[0][2], errors[0][3], original=_unpickled(errors[0]), silent=silent,
                     phases={r: p for r, p in phases.items() if p is not None})
