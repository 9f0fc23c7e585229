"""``distattn cluster probe``: time the collectives our schedulers use through torch.distributed.

Works on whatever backend the process group has (gloo on CPUs here, nccl on GPUs), where
nccl-tests is not available. Every op is run ``warmup`` times untimed, then ``iters`` times; the
time of an iteration is the slowest rank's, and the median iteration is kept. Sizes follow
nccl-tests (see :mod:`distattn.costmodel.network`), so both feed the same :class:`NetworkProfile`.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from ..distributed.comm import all_gather_single, reduce_scatter_single
from ..distributed.timing import slowest_rank, time_calls
from . import PROBED
from ..costmodel.network import Measurement, NetworkProfile, parse_size


def parse_sizes(text: str) -> list[int]:
    """``"4K:16M"`` (powers of two from 4 KiB to 16 MiB) or ``"1024,65536"``."""
    def one(tok: str) -> int:
        return parse_size(tok, "--sizes")

    if ":" in text:
        lo, hi = (one(t) for t in text.split(":", 1))
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 2
    else:
        sizes = [one(t) for t in text.split(",") if t.strip()]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"--sizes {text!r} gives no positive sizes; use e.g. 4K:16M")
    return sizes


def _op_runner(op: str, size: int, group, device):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    elems = max(n, size // 4 // n * n)  # fp32, divisible by the world size
    if op == "all_gather":
        inp, out = torch.ones(elems // n, device=device), torch.empty(elems, device=device)
        return lambda: all_gather_single(out, inp, group=group), elems * 4
    if op == "reduce_scatter":
        inp, out = torch.ones(elems, device=device), torch.empty(elems // n, device=device)
        return lambda: reduce_scatter_single(out, inp, group=group), elems * 4
    if op == "all_to_all":
        inp, out = torch.ones(elems, device=device), torch.empty(elems, device=device)
        return lambda: dist.all_to_all_single(out, inp, group=group), elems * 4
    if op == "send_recv":
        msg, buf = torch.ones(max(1, size // 4), device=device), torch.empty(max(1, size // 4), device=device)
        nxt = dist.get_global_rank(group, (rank + 1) % n) if group is not None else (rank + 1) % n
        prv = dist.get_global_rank(group, (rank - 1) % n) if group is not None else (rank - 1) % n

        def ring_shift():
            for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, msg, nxt, group),
                                               dist.P2POp(dist.irecv, buf, prv, group)]):
                req.wait()
        return ring_shift, msg.numel() * 4
    raise ValueError(f"probe: unknown op {op!r}; choose from {', '.join(PROBED)}")


def probe(sizes: list[int], ops=PROBED, iters: int = 5, warmup: int = 2, group=None,
          progress=None) -> list[Measurement]:
    """Measure on every rank of ``group`` (collective: all ranks call it); every rank gets the rows."""
    if iters < 1 or warmup < 0:
        raise ValueError("--iters must be >= 1 and --warmup >= 0")
    n = dist.get_world_size(group)
    if n < 2:
        raise ValueError("probe needs at least 2 ranks: a collective on one rank moves nothing")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    rows = []
    for op in ops:
        for size in sizes:
            run, nbytes = _op_runner(op, size, group, device)
            timing = time_calls(run, iters, warmup, barrier=True, group=group, device=device)
            # an iteration lasts as long as its slowest rank; the median of those is kept
            times = slowest_rank(timing.seconds, group, device)
            rows.append(Measurement(op, n, nbytes, statistics.median(times) * 1e6))
            if progress is not None:
                progress(rows[-1])
    return rows


def probe_profile(sizes, ops=PROBED, iters: int = 5, warmup: int = 2, group=None, progress=None) -> NetworkProfile:
    rows = probe(sizes, ops, iters, warmup, group, progress if dist.get_rank() == 0 else None)
    return NetworkProfile(tuple(rows), source="distattn cluster probe", backend=dist.get_backend(group),
                          gpus_per_node=torch.cuda.device_count() or dist.get_world_size(group))
