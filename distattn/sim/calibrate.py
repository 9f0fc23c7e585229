"""``distattn simulate --calibrate RESULTS``: the simulator's prediction of ``distattn bench`` rows.

The machine is measured independently of the bench: one thread's attention FLOP/s on each case's
documents (one causal call over them: a kernel's efficiency depends on its segments' lengths) past
the fixed cost of a kernel call (a 16-token one), and the collectives by ``cluster probe`` on gloo
at the bench's world sizes (or a given profile). Every
bench row is replayed with the same dry schedule and executor program as
:func:`distattn.sim.simulate.simulate` (attention only, no linear layers), on the CPU as it is:

* the bench's ``P`` ranks share the machine's ``C`` cores: a rank computing beside ``k - 1`` others
  gets ``min(1, C / k)`` of a core (processor sharing), so ranks that wait leave their share to
  the others; a computation costs the call's fixed time plus its FLOPs at the one-core rate;
* a transfer takes the probe's time once every rank it needs (its group, or those it exchanges
  data with) has issued it, one communicator's transfers in order; gloo's ``wait`` blocks the
  process (a chained hop is a wait, then a start);
* around each collective the rank copies its buffer (gathering the rows it sends, placing what
  arrives) at one thread's copy rate, as computation (a ring step sends and receives in place).

The error ``predicted / measured - 1`` is reported per row and per scheduler, and beside each row
every rank's predicted time held up by communication against what its executor clocked
(``rank_comm_wait_ms``, :meth:`distattn.plans.Plan.comm_wait_seconds`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cost import document_flops
from ..doclens import mask_case
from ..program import BACKWARD, CHAIN, FORWARD, RUN, START, WAIT
from ..schedule import AttnShape
from ..schedulers import PlanContext
from ..timing import time_calls
from .replay import Op, TimedProgram, _coupled, _seconds, call_ops
from .simulate import comm_time, dry_schedule, nccl_size


@dataclass(frozen=True)
class Machine:
    """The fixed seconds of a kernel call forward and backward (what a 16-token call takes on one
    thread), one thread's bytes/s copying into a fresh buffer (what gathering a transfer's rows
    and placing what arrives costs), the machine's cores, and one thread's attention FLOP/s on each
    bench case's documents (measured on demand: a kernel's efficiency depends on its segments' lengths)."""

    fwd_call_s: float
    bwd_call_s: float
    copy_bytes_s: float
    cores: int
    rates: dict = field(default_factory=dict, compare=False)   # (docs, heads, kv_heads, head_dim) -> FLOP/s

    def rate(self, docs, heads: int, kv_heads: int, head_dim: int) -> float:
        """One thread's fwd+bwd FLOP/s past the fixed cost, on one causal call over ``docs``."""
        key = (tuple(docs), heads, kv_heads, head_dim)
        if key not in self.rates:
            fwd, bwd = _on_one_thread(_time_kernels, docs, heads, kv_heads, head_dim)
            flops = document_flops(docs, True, None, heads, head_dim)   # forward and backward
            self.rates[key] = flops / max(fwd + bwd - self.fwd_call_s - self.bwd_call_s, 1e-9)
        return self.rates[key]


def _on_one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _time_kernels(docs, heads: int, kv_heads: int, head_dim: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one forward and one backward kernel call over causal documents ``docs``."""
    from ..kernels import attn_bwd, attn_fwd

    g = torch.Generator().manual_seed(0)
    n = sum(docs)
    q, dout = (torch.randn(n, heads, head_dim, generator=g) for _ in "qd")
    k, v = (torch.randn(n, kv_heads, head_dim, generator=g) for _ in "kv")
    cu = torch.tensor([0, *np.cumsum(docs).tolist()], dtype=torch.int32)
    out, lse = attn_fwd(q, k, v, cu, cu)
    fwd = time_calls(lambda: attn_fwd(q, k, v, cu, cu), repeats, warmup=1).median
    bwd = time_calls(lambda: attn_bwd(dout, q, k, v, out, lse, cu, cu), repeats, warmup=1).median
    return fwd, bwd


def measure_machine(cores: int, heads: int = 8, kv_heads: int = 4, head_dim: int = 64) -> Machine:
    """This machine's fixed cost of a kernel call (a 16-token one) and its copy rate (16 MiB), one thread."""
    fwd, bwd = _on_one_thread(_time_kernels, [16], heads, kv_heads, head_dim, 5)
    x = torch.randn(4 * 2**20)
    copy = _on_one_thread(lambda: time_calls(x.clone, 5, warmup=1).median)
    return Machine(fwd, bwd, x.numel() * x.element_size() / copy, cores)


def replay_shared(ops, ranks: int, cores: int) -> tuple[np.ndarray, np.ndarray]:
    """``(end, stalled)`` per rank of ``ops`` (:mod:`distattn.sim.replay`'s operations; a ``run``'s
    seconds are one core's) on ``cores`` cores shared by the ranks computing at each moment; a
    rank blocked in a wait takes none (module docstring)."""
    replay = _SharedReplay(ops, ranks)
    for _ in range(100 * len(ops) + 10):
        for r in range(ranks):
            replay.advance(r)
        if not replay.step(cores):
            break
    assert all(p == len(ops) for p in replay.pos), "the replay stalled: a transfer some rank never issued"
    return np.full(ranks, replay.t), replay.stalled


class _SharedReplay:
    """:func:`replay_shared`'s state: the time, each rank's next operation, what is left of its
    computation and what it waits for, and the transfers issued so far."""

    def __init__(self, ops, ranks: int):
        self.ops, self.ranks = ops, ranks
        self.pos, self.t = [0] * ranks, 0.0
        self.left = np.zeros(ranks)                  # core-seconds left of the running computation
        self.blocked: list = [None] * ranks          # the transfer key a rank waits for
        self.issued: dict = {}                       # key -> {rank: issue time}
        self.ends: dict = {}                         # key -> per-rank end times, once every member issued
        self.queue, self.stalled, self.since = np.zeros(ranks), np.zeros(ranks), np.zeros(ranks)

    def issue(self, r: int, op, ready: float) -> None:
        got = self.issued.setdefault(op.key, {})
        got[r] = ready
        if len(got) == self.ranks:   # every rank issues every transfer (the instructions are the same)
            start = np.asarray([got[i] for i in range(self.ranks)])
            self.queue[:] = _coupled(np.maximum(start, self.queue), op) + _seconds(op)
            self.ends[op.key] = self.queue.copy()

    def advance(self, r: int) -> None:
        """Run rank ``r``'s instructions until it computes, blocks or ends."""
        while self.pos[r] < len(self.ops):
            op = self.ops[self.pos[r]]
            if op.op == RUN:   # (step moves past it once done)
                if self.left[r] <= 0 and op.seconds[r] > 0:
                    self.left[r] = op.seconds[r]
                if self.left[r] > 0:
                    return
            elif op.op in (WAIT, CHAIN):
                key = op.key if op.op == WAIT else op.after
                if key not in self.ends or self.ends[key][r] > self.t:
                    if self.blocked[r] is None:
                        self.blocked[r], self.since[r] = key, self.t
                    return
                if self.blocked[r] is not None:
                    self.stalled[r] += self.t - self.since[r]
                    self.blocked[r] = None
                if op.op == CHAIN:   # the hop before is in: start this one
                    self.issue(r, op, self.t)
            else:
                assert op.op == START, op.op
                self.issue(r, op, self.t)
            self.pos[r] += 1

    def step(self, cores: int) -> bool:
        """Move time on to the next computation's end or transfer's arrival, the computing ranks
        sharing ``cores``; False when no rank computes or waits (the replay is over)."""
        computing = [r for r in range(self.ranks) if self.left[r] > 0]
        waiting = [self.ends[b][r] for r, b in enumerate(self.blocked) if b is not None and b in self.ends]
        if not computing and not waiting:
            return False
        share = min(1.0, cores / max(len(computing), 1))
        step = min([self.left[r] / share for r in computing] + [w - self.t for w in waiting])
        for r in computing:
            self.left[r] = max(self.left[r] - step * share, 0.0)
            if self.left[r] <= 1e-15:
                self.left[r], self.pos[r] = 0.0, self.pos[r] + 1
        self.t += max(step, 0.0)
        return True


def predict_row(row: dict, machine: Machine, network, pool=None, seed: int = 0) -> tuple[float, np.ndarray]:
    """Predicted fwd+bwd ms of one bench row, and each rank's ms held up by communication."""
    p = row["world_size"]
    case = mask_case(row["mask"], row["seq_len"], pool, seed)
    name = {"deepspeed-ulysses": "ulysses", "local": "ring"}.get(row["scheduler"], row["scheduler"])
    schedule = dry_schedule(name, case.docs, p, PlanContext(row["heads"], row["kv_heads"], head_dim=row["head_dim"],
                                                                  dtype_bytes=4 if row["dtype"] == "fp32" else 2),
                            **case.plan_kwargs())
    shape = AttnShape(row["heads"], row["kv_heads"], row["head_dim"], 4 if row["dtype"] == "fp32" else 2)
    rate = machine.rate(case.docs if case.slices is None else [row["seq_len"]], row["heads"], row["kv_heads"],
                        row["head_dim"])

    def compute_s(ph):   # FLOPs at one core's rate, plus a call's fixed cost
        fixed = machine.fwd_call_s if ph.direction == "forward" else machine.bwd_call_s
        return np.asarray(ph.amount, np.float64) / rate + fixed
    program = schedule.call_program(shape)
    timed = TimedProgram.of(program, p, compute_s, lambda ph: comm_time(network, ph))
    # the host's copies around each collective: its rows gathered into the send buffer, what arrives
    # placed (a ring step sends and receives whole K/V blocks in place)
    def copy_s(ph):   # (an all-to-all's buffers hold the rows a rank sends itself too)
        buffer = nccl_size(ph.op, ph.span, ph.amount) if ph.kept is None else ph.amount + ph.kept
        return (ph.op != "send_recv") * buffer / machine.copy_bytes_s
    copies = TimedProgram.of(program, p, lambda ph: np.zeros(len(ph.rank)), copy_s)
    ops = with_copies(call_ops(timed, p, FORWARD + BACKWARD), call_ops(copies, p, FORWARD + BACKWARD))
    end, stalled = replay_shared(ops, p, machine.cores)
    return float(end.max()) * 1e3, stalled * 1e3


def with_copies(ops, copies) -> list:
    """``ops`` with the host's copies as computation (``copies``: the same operations, each transfer's
    seconds those of copying its buffer): before a start (gathering its rows) and after a wait
    (placing what arrived); a chained hop does both."""
    out = []
    for op, copy in zip(ops, copies):
        if op.op in (START, CHAIN):
            out.append(Op(RUN, copy.seconds))
        out.append(op)
        if op.op == WAIT:
            out.append(Op(RUN, copy.seconds))
    return out


def calibrate(rows: list[dict], network, machine: Machine, pool=None, seed: int = 0) -> tuple[list[dict], dict]:
    """(rows with ``predicted_ms``, ``error`` and ``predicted_rank_comm_wait_ms``, median |error| per
    scheduler)."""
    out = []
    for r in rows:
        pred, waits = predict_row(r, machine, network, pool, seed)
        out.append(dict(r, predicted_ms=pred, error=pred / r["fwd_bwd_ms"] - 1, predicted_rank_comm_wait_ms=waits))
    per = {name: statistics.median(abs(r["error"]) for r in out if r["scheduler"] == name)
           for name in sorted({r["scheduler"] for r in out})}
    return out, per
