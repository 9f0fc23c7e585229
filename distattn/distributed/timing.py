"""Wall-clock timing of repeated calls: the one loop behind the benchmarks, the demo, ``cluster probe``
and the simulator's calibration.

Units: everything here is in **seconds** (``time.perf_counter`` differences, as floats); callers
convert to the milliseconds or microseconds they print.

* :func:`time_calls` runs a function ``warmup`` times untimed, then ``repeats`` times timed;
  :func:`time_interleaved` does the same for several functions in alternation (one round calls each
  once) so that drift (thermal, caches, a neighbour's load) hits them all alike. Before each call,
  warm-up included, the device is synchronised and, with ``barrier=True``, the ranks of ``group``
  meet, so a timed call starts on every rank together and includes none of the previous call's
  queued GPU work.
* :func:`slowest_rank` takes the maximum of per-rank values over a process group, element by element;
  :func:`slowest_median` is the usual "median of the repeats, slowest rank" of a benchmark.

This module is part of the foundation layer (the kernels import it): it imports nothing from distattn.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


@dataclass
class Timing:
    """What :func:`time_calls` measured of one function."""

    seconds: list[float]  # one per timed call, in call order
    result: Any = None    # what the function returned on its last call

    @property
    def median(self) -> float:
        """Median seconds of the timed calls."""
        return statistics.median(self.seconds)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the queued work of ``device`` when it is a CUDA device; nothing otherwise.

    Only an explicit CUDA device is synchronised: a CPU benchmark on a machine with GPUs must not
    create a CUDA context in every worker process.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Sequence[Callable[..., Any]], repeats: int, warmup: int = 0, *,
                     setup: Callable[[], Any] | None = None, barrier: bool = False, group=None,
                     device: torch.device | str | None = None) -> list[Timing]:
    """Time each of ``fns`` over ``warmup`` untimed then ``repeats`` timed rounds, alternating them.

    Every call is: ``x = setup()`` (untimed, when given), synchronise ``device``, barrier on
    ``group`` (when ``barrier``), then ``fn(x)`` (or ``fn()`` without ``setup``) and synchronise
    again inside the timed span. With ``barrier`` every rank of ``group`` must call this alike.
    Returns one :class:`Timing` per function, in the order of ``fns``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timings = [Timing([]) for _ in fns]
    for round_ in range(warmup + repeats):
        for fn, timing in zip(fns, timings):
            args = () if setup is None else (setup(),)
            synchronize(device)
            if barrier:
                dist.barrier(group)
            t0 = time.perf_counter()
            timing.result = fn(*args)
            synchronize(device)
            elapsed = time.perf_counter() - t0
            if round_ >= warmup:
                timing.seconds.append(elapsed)
    return timings


def time_calls(fn: Callable[..., Any], repeats: int, warmup: int = 0, *, setup: Callable[[], Any] | None = None,
               barrier: bool = False, group=None, device: torch.device | str | None = None) -> Timing:
    """Time ``fn`` over ``warmup`` untimed then ``repeats`` timed calls (see :func:`time_interleaved`)."""
    return time_interleaved([fn], repeats, warmup, setup=setup, barrier=barrier, group=group, device=device)[0]


def slowest_rank(values: Sequence[float], group=None, device: torch.device | str | None = None) -> list[float]:
    """The element-wise maximum of ``values`` over the ranks of ``group`` (all of them must call this).

    The reduction runs on ``device``; by default CUDA for an nccl group (nccl reduces only CUDA
    tensors), else the CPU. Without an initialised process group the values come back unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def slowest_median(seconds: Sequence[float], group=None, device: torch.device | str | None = None) -> float:
    """This rank's median of ``seconds``, then the largest such median over the ranks of ``group``."""
    return slowest_rank([statistics.median(seconds)], group, device)[0]
