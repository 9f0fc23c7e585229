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
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


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
    ctx.set_forkserver_preload(["torch", "torch.distributed", "distattn"])
    return ctx


def _worker(fn, args, kwargs, rank, world_size, init_file, collective_timeout, threads, backend, results):
    import torch
    import torch.distributed as dist

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
                    **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result.
    ``backend="nccl"`` runs one rank per GPU instead (rank ``i`` on ``cuda:i``).

    Raises :class:`RankError` if a rank raises or dies, :class:`TimeoutError` if not all
    ranks finish within ``timeout`` seconds. Every process is gone when this returns.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0 or collective_timeout <= 0:
        raise ValueError("timeout and collective_timeout must be positive seconds")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="distattn-spawn-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, args, kwargs, rank, world_size, init_file, collective_timeout,
                                   threads_per_rank, backend, results))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)


def _get(results, timeout: float):
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        return None


def _collect(procs, results, world_size: int, timeout: float) -> list[Any]:
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(done) < world_size:
        msg = _get(results, 0.2)
        if msg is not None and msg[1] == "ok":
            done[msg[0]] = pickle.loads(msg[2])
            continue
        crashed = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
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
