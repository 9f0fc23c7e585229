"""``distattn simulate --calibrate``: the simulator's prediction of ``distattn bench`` rows.

Every bench row is replayed with the same dry schedule and executor program as
:func:`distattn.sim.simulate.simulate` (attention only, no linear layers), on a model of the CPU
as it runs it (:class:`Machine`; :mod:`distattn.sim.calib_fit` fits it to one bench, and says which
parameters the bench decides and which are measured apart):

* the kernel: each rank's kernel calls are the segments its schedule computes
  (``Schedule.compute_slices``), cut into the fused calls ``backend="torch"`` makes on CPU
  (:func:`distattn.kernels.torch_cpu.tile_shapes`: a masked tile computes its whole rectangle, an
  ``is_causal`` one its key blocks up to the diagonal). A tile of ``rows`` queries computing
  ``pairs`` pairs costs ``tile_s`` plus its FLOPs at ``rate(L) = flop_s * L / (L + half_keys)``,
  ``L = pairs / rows`` the keys a row sees: a kernel's efficiency grows with its segments' lengths,
  as every row pays a fixed amount (the log-sum-exp merge of its partial result, the softmax's
  bookkeeping) worth ``half_keys`` keys. A step's kernel call adds ``call_s``. A rank's tiles are
  shared among its steps by their FLOPs (the ring's steps split them; a head split computes every
  one with fewer heads: the work scales with the heads, the fixed costs do not). The backward's
  FLOPs (2.5x) run at the same rate; fixed costs are paid in each direction;
* the ``P`` ranks share what other processes leave of the machine's ``cores``: a rank computing
  beside ``k - 1`` others gets ``min(1, (cores - others) / (k + background))`` of a core (processor
  sharing), so ranks that wait leave their share to the others. ``others`` is what the bench
  measured other processes to keep busy during the row (``cpu_others``: on a shared machine it
  changes from row to row); a bench without that column has ``background`` runnable threads of
  other work instead, fitted;
* a transfer takes ``net_scale`` times the network profile's time (``cluster probe``: gloo at the
  bench's world sizes), stretched by ``cores / (cores - others)``: gloo on one machine moves bytes
  with the CPU (socket copies, reductions), so what other processes take slows it as it slows the
  kernels. It starts once every rank it needs has issued it, one communicator's transfers in order;
  gloo's ``wait`` blocks the process (a chained hop is a wait, then a start);
* around each collective the rank copies its buffer (gathering the rows it sends, placing what
  arrives) at ``copy_bytes_s``, as computation (a ring step sends and receives in place).

The error ``predicted / measured - 1`` is reported per row and per scheduler, and beside each row
every rank's predicted time held up by communication against what its executor clocked
(``rank_comm_wait_ms``, :meth:`distattn.runtime.plans.Plan.comm_wait_seconds`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import MISSING, asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..costmodel.cost import Roofline
from ..planning.doclens import mask_case
from ..costmodel.jsonfile import read_json
from ..planning.masks import UNBOUNDED
from ..planning.program import BACKWARD, CHAIN, FORWARD, RUN, START, WAIT
from ..planning.schedule import AttnShape
from ..schedulers import PlanContext, spec
from .replay import Op, TimedProgram, _coupled, _seconds, call_ops
from .simulate import comm_time, dry_schedule, nccl_size

# one thread copying into a fresh buffer (page faults included); the bench's copies are a few MB a
# row, under 1% of its time, so no bench can fit this: it is a nominal figure, not a fitted one
COPY_BYTES_S = 4e9
ALIASES = {"deepspeed-ulysses": "ulysses", "local": "ring"}   # a bench row's name -> the schedule it replays


@dataclass(frozen=True)
class Machine:
    """The CPU as the bench runs attention on it (module docstring): one core's attention FLOP/s on
    long rows, the keys per query row at which a tile runs at half that, the fixed seconds of a fused
    call (tile) and of a step's kernel call (each direction), the machine's cores, the runnable
    threads of other jobs beside the ranks (for a bench that did not measure what they took), a
    factor on the network profile's times and the copy rate."""

    flop_s: float
    half_keys: float
    tile_s: float
    call_s: float
    cores: float
    background: float = 0.0
    net_scale: float = 1.0
    copy_bytes_s: float = COPY_BYTES_S

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and f.name in ("flop_s", "cores", "copy_bytes_s")):
                raise ValueError(f"Machine.{f.name} is {value!r}; give a finite number >= 0 (> 0 for flop_s, "
                                 f"cores and copy_bytes_s)")

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "Machine":
        names = [f.name for f in fields(Machine)]
        refusal = ValueError(f"not a calibrated machine: expected numbers for {', '.join(names)}; write one with "
                             f"`distattn simulate --calibrate FIT_CSV --save-model PATH`")
        if not isinstance(data, dict) or any(k not in names for k in data) or \
                any(f.name not in data for f in fields(Machine) if f.default is MISSING):
            raise refusal
        try:
            values = {k: float(v) for k, v in data.items()}
        except (TypeError, ValueError):
            raise refusal from None
        return Machine(**values)


def save_model(path, machine: Machine, network) -> None:
    """A fitted model as JSON: the machine and the network profile it was fitted with (replaying it
    needs no measurement)."""
    Path(path).write_text(json.dumps({"machine": machine.to_json(), "network": network.to_json()}, indent=1))


def load_model(path) -> tuple[Machine, object]:
    """``(machine, network)`` of a :func:`save_model` file."""
    from ..costmodel.network import NetworkProfile

    try:
        data = read_json(path, "a calibrated model (distattn simulate --calibrate FIT_CSV --save-model PATH)")
        return Machine.from_json(data["machine"]), NetworkProfile.from_json(data["network"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a calibrated model ({exc}); write one with `distattn simulate "
                         f"--calibrate FIT_CSV --save-model PATH`") from None


def measure_tile_seconds(segments: int = 64, tokens: int = 16, heads: int = 8, kv_heads: int = 4,
                         head_dim: int = 64) -> float:
    """The fixed seconds of one fused call each direction (:attr:`Machine.tile_s`): one thread's
    CPU time of a forward and a backward over ``segments`` causal segments of ``tokens`` tokens, per
    segment and direction, the least of ten. CPU time, not wall time, and the least: what other
    processes take does not count, nor do the caches they evict."""
    import torch

    from ..kernels import attn_bwd, attn_fwd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        n = segments * tokens
        q, dout = (torch.randn(n, heads, head_dim, generator=g) for _ in "qd")
        k, v = (torch.randn(n, kv_heads, head_dim, generator=g) for _ in "kv")
        cu = torch.arange(0, n + 1, tokens, dtype=torch.int32)
        out, lse = attn_fwd(q, k, v, cu, cu, backend="torch")
        times = []
        for _ in range(10):
            t0 = time.thread_time()
            attn_fwd(q, k, v, cu, cu, backend="torch")
            attn_bwd(dout, q, k, v, out, lse, cu, cu, backend="torch")
            times.append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return min(times) / (2 * segments)


@lru_cache(maxsize=65536)
def _segment_tiles(m: int, n: int, lo: int, hi: int) -> tuple[int, int, int]:
    """``(pairs computed, rows over the tiles, tiles)`` of one segment on the CPU kernel."""
    from ..kernels.torch_cpu import tile_shapes

    shapes = tile_shapes(m, n, lo, hi)
    return sum(s[2] for s in shapes), sum(s[0] for s in shapes), len(shapes)


def tile_stats(slices) -> tuple[int, int, int, int]:
    """``(visible pairs, pairs computed, rows over the tiles, tiles)`` of a rank's segments
    (:class:`~distattn.planning.masks.MaskSlice`, global positions; one head)."""
    visible = computed = rows = tiles = 0
    for s in slices:
        shift = s.k_start - s.q_start   # the band relative to the segment's corner, unbounded sides kept
        lo = -UNBOUNDED if s.lo is None else s.lo - shift
        hi = UNBOUNDED if s.hi is None else s.hi - shift
        c, r, t = _segment_tiles(s.q_end - s.q_start, s.k_end - s.k_start, lo, hi)
        visible += s.area()
        computed, rows, tiles = computed + c, rows + r, tiles + t
    return visible, computed, rows, tiles


# an operation's seconds are linear in the machine's parameters: ``seconds = sum(coefficient[b] * part[b])``
# over these parts (prepared once per row, so a fit re-times a row without re-planning it)
PARTS = ("call", "work", "row", "tile", "comm", "copy")


def coefficients(machine: Machine) -> np.ndarray:
    """The factor of each of :data:`PARTS`."""
    return np.asarray([machine.call_s, 1 / machine.flop_s, machine.half_keys / machine.flop_s, machine.tile_s,
                       machine.net_scale, 1 / machine.copy_bytes_s])


@dataclass(frozen=True, eq=False)
class RowCase:
    """One bench row made ready to time: the operations of its program (:func:`with_copies`) and
    each one's seconds per rank in :data:`PARTS` (``parts [ops, parts, ranks]``)."""

    row: dict
    ranks: int
    ops: tuple
    parts: np.ndarray

    @property
    def others(self) -> float:
        """Cores other processes kept busy during the row (0 when the bench did not measure it)."""
        value = self.row.get("cpu_others", math.nan)
        return value if math.isfinite(value) else 0.0

    def cores(self, machine: Machine) -> float:
        """The cores left to the ranks (at least a twentieth of one: a row ran, so it had some)."""
        return max(machine.cores - self.others, 0.05)

    def operations(self, machine: Machine) -> list[Op]:
        """The row's operations timed on ``machine``: transfers stretched by the cores others took."""
        factors = coefficients(machine)
        factors[PARTS.index("comm")] *= machine.cores / self.cores(machine)
        seconds = np.einsum("opr,p->or", self.parts, factors)
        return [Op(op.op, sec, op.key, op.span, op.p2p, op.after, op.links) for op, sec in zip(self.ops, seconds)]


def _ratio(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape)), where=b > 0)


def _compute_parts(stats: np.ndarray, flops: dict, ph) -> np.ndarray:
    """``[parts, entries]``: one core's seconds of each entry of an attention phase by part (module
    docstring): a call; its FLOPs over the rank's computed / visible pairs; over its tile rows /
    visible pairs (times ``half_keys``); its share (by FLOPs) of the rank's tiles."""
    visible, computed, rows, tiles = stats[ph.rank].T
    amount = np.asarray(ph.amount, dtype=np.float64)
    out = np.zeros((len(PARTS), len(amount)))
    out[0] = 1.0
    out[1], out[2] = amount * _ratio(computed, visible), amount * _ratio(rows, visible)
    out[3] = tiles * _ratio(amount, flops[ph.direction][ph.rank])
    return out


def _timed_parts(program, p: int, stats: np.ndarray, network) -> tuple[list[Op], np.ndarray]:
    """The program's operations (:func:`with_copies`) and their seconds by part (:class:`RowCase`)."""
    flops = {d: np.zeros(p) for d in ("forward", "backward")}
    for ph in program.phases:
        if not ph.is_comm:
            np.add.at(flops[ph.direction], ph.rank, np.asarray(ph.amount, dtype=np.float64))

    def copy_bytes(ph):   # (an all-to-all's buffers hold the rows a rank sends itself too)
        buffer = nccl_size(ph.op, ph.span, ph.amount) if ph.kept is None else ph.amount + ph.kept
        return (ph.op != "send_recv") * np.asarray(buffer, dtype=np.float64)
    compute = {id(ph): _compute_parts(stats, flops, ph) for ph in program.phases if not ph.is_comm}
    comm = {id(ph): comm_time(network, ph) for ph in program.phases if ph.is_comm}
    copies = {id(ph): copy_bytes(ph) for ph in program.phases if ph.is_comm}

    def zero(ph):
        return np.zeros(len(ph.rank))
    parts = []
    for i, name in enumerate(PARTS):
        timed = TimedProgram.of(program, p, lambda ph: compute[id(ph)][i],
                                lambda ph: comm[id(ph)] if name == "comm" else zero(ph))
        moved = TimedProgram.of(program, p, zero, lambda ph: copies[id(ph)] if name == "copy" else zero(ph))
        parts.append(with_copies(call_ops(timed, p, FORWARD + BACKWARD), call_ops(moved, p, FORWARD + BACKWARD)))
    return parts[0], np.stack([[op.seconds for op in ops] for ops in parts], axis=1)


def prepare_row(row: dict, network, pool=None, seed: int = 0) -> RowCase:
    """The row's dry schedule (the bench's documents: ``pool`` and ``seed`` as it drew them) and
    program, timed by part on ``network``."""
    p = row["world_size"]
    case = mask_case(row["mask"], row["seq_len"], pool, seed)
    dtype_bytes = 4 if row["dtype"] == "fp32" else 2
    context = PlanContext(row["heads"], row["kv_heads"], head_dim=row["head_dim"], dtype_bytes=dtype_bytes)
    name = ALIASES.get(row["scheduler"], row["scheduler"])
    # what cad's servers kept for the backward: rows written before results.csv named it kept everything;
    # on a CPU the bench balances cad's pairs (distattn.bench.suite: a roofline)
    cost = Roofline(num_heads=row["heads"], num_kv_heads=row["kv_heads"], head_dim=row["head_dim"],
                    dtype_bytes=dtype_bytes) if row.get("device", "cpu") == "cpu" else None
    options = spec(name).taken({"backward": row.get("cad_backward") or "keep", **({"cost": cost} if cost else {})})
    schedule = dry_schedule(name, case.docs, p, context, **case.plan_kwargs(), **options)
    program = schedule.call_program(AttnShape(row["heads"], row["kv_heads"], row["head_dim"], dtype_bytes))
    stats = np.asarray([tile_stats(schedule.compute_slices(r)) for r in range(p)], dtype=np.float64)
    ops, parts = _timed_parts(program, p, stats, network)
    return RowCase(row, p, tuple(ops), parts)


def predict_case(case: RowCase, machine: Machine) -> tuple[float, np.ndarray]:
    """Predicted fwd+bwd ms of one prepared bench row, and each rank's ms held up by communication."""
    end, stalled = replay_shared(case.operations(machine), case.ranks, case.cores(machine), machine.background)
    return float(end.max()) * 1e3, stalled * 1e3


def predict_row(row: dict, machine: Machine, network, pool=None, seed: int = 0) -> tuple[float, np.ndarray]:
    """Predicted fwd+bwd ms of one bench row, and each rank's ms held up by communication."""
    return predict_case(prepare_row(row, network, pool, seed), machine)


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


def replay_shared(ops, ranks: int, cores: float, background: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(end, stalled)`` per rank of ``ops`` (:mod:`distattn.sim.replay`'s operations; a ``run``'s
    seconds are one core's) on ``cores`` cores shared by the ranks computing at each moment and
    ``background`` threads of other jobs; a rank blocked in a wait takes none (module docstring)."""
    replay = _SharedReplay(ops, ranks)
    for _ in range(100 * len(ops) + 10):
        for r in range(ranks):
            replay.advance(r)
        if not replay.step(cores, background):
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

    def step(self, cores: float, background: float) -> bool:
        """Move time on to the next computation's end or transfer's arrival, the computing ranks
        sharing ``cores`` with ``background`` other threads; False when no rank computes or waits
        (the replay is over)."""
        computing = [r for r in range(self.ranks) if self.left[r] > 0]
        waiting = [self.ends[b][r] for r, b in enumerate(self.blocked) if b is not None and b in self.ends]
        if not computing and not waiting:
            return False
        share = min(1.0, cores / (max(len(computing), 1) + background))
        step = min([self.left[r] / share for r in computing] + [w - self.t for w in waiting])
        for r in computing:
            self.left[r] = max(self.left[r] - step * share, 0.0)
            if self.left[r] <= 1e-15:
                self.left[r], self.pos[r] = 0.0, self.pos[r] + 1
        self.t += max(step, 0.0)
        return True


def score(cases: list[RowCase], machine: Machine) -> tuple[list[dict], dict]:
    """(rows with ``predicted_ms``, ``error`` and ``predicted_rank_comm_wait_ms``, median |error| per
    scheduler)."""
    out = []
    for c in cases:
        pred, waits = predict_case(c, machine)
        out.append(dict(c.row, predicted_ms=pred, error=pred / c.row["fwd_bwd_ms"] - 1,
                        predicted_rank_comm_wait_ms=waits))
    return out, median_errors(out)


def median_errors(rows: list[dict]) -> dict:
    """Median |error| per scheduler, by name."""
    return {name: statistics.median(abs(r["error"]) for r in rows if r["scheduler"] == name)
            for name in sorted({r["scheduler"] for r in rows})}


def calibrate(rows: list[dict], network, machine: Machine, pool=None, seed: int = 0) -> tuple[list[dict], dict]:
    """:func:`score` of bench ``rows`` (their documents: ``pool``, ``seed``)."""
    return score([prepare_row(r, network, pool, seed) for r in rows], machine)
