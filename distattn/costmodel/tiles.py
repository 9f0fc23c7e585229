"""The attention kernel's time from its tiles, per direction: one model, fitted to measured latencies.

A FlashAttention-style varlen kernel runs each direction as a grid of CTAs over one axis of every
segment, each CTA looping over blocks of the other axis (FlashAttention-2's tiles at head dim 128 on
sm80/sm90; FlashAttention-3's backward has the same grid):

* **forward**: one CTA per (128 query rows, query head), looping over the 64-key blocks its rows see;
* **backward**: one CTA per (128 keys, query head), looping over the 64-row query blocks that see them.

A CTA costs ``fixed`` iterations (loading its block, writing its result) plus one per block it loops
over; an iteration is ``iter_s`` of an SM on a full GPU. A call's CTAs run in waves over the GPU's
``sms`` SMs: it takes the larger of their total over the SMs and its longest CTA's critical path
(``lone * iter_s`` an iteration), plus ``call_s``. The blocks a segment's CTAs loop over are its
visible pairs over a block's pairs (8,192 both ways); what the diagonal leaves part-empty is part of
``fixed`` (the tables it is fitted to are causal). So a task of few query rows against a long key
prefix -- CAD's -- runs its forward at full speed (few CTAs, long loops) and its backward as many
CTAs with short loops, much of them fixed cost (:meth:`TileModel.task_seconds`).

**Tables** (:func:`read_table`): ``L, cp, tp, duration_per_doc`` (ms) as DistCA's profiler writes
them -- causal, bottom-right aligned, ``L // cp`` query rows against ``(1/2 + 1/(2 cp)) L`` keys (one
CP rank's average share of a document of ``L``), ``LATENCY_TABLE_HEADS / tp`` query heads; the rows
say no direction and are read as forward + backward (the reading that fits: a forward-only tile model
misses the ``cp = 8`` rows by up to 43%; DistCA's profiler script, as published, times a forward at 64
query heads, whose 64K row would be FA2's forward speed -- the GPU report's own rows, each direction
timed apart, settle it) -- or rows naming their shape: ``q_len, k_len,
heads, direction`` (``forward``, ``backward`` or ``both``), ``ms`` and optionally ``segments`` (equal
segments in the call) and ``backend``, as the GPU report writes them (``python -m
distattn.kernels.bench --table``).

**Fit** (:func:`fit`): ``call_s``, the forward's ``iter_s``, ``fixed`` (one count for both
directions) and ``lone``, least squares on the log of modelled over measured time. The backward's
``iter_s`` is fitted too where the table times the directions apart; otherwise it is
:data:`BWD_ITER_RATIO` times the forward's (the rows of one direction cannot tell them apart: both
blocks hold 8,192 pairs). ``distattn cluster kernel-fit TABLE --check`` prints every row measured
against modelled.

**Shipped** (:data:`H100`): the fit to ``attn_latency_h100.csv`` (every row), so the model works
without the table; :func:`distattn.kernels.speed.kernel_model` puts it on a job's GPU and kernels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .model_shape import BWD_FLOPS_FACTOR

DIRECTIONS = ("forward", "backward")
LATENCY_TABLE_HEADS = 32        # query heads a latency table's tp = 1 rows are read as (Llama-3 8B's)
# the backward's iteration over the forward's where a table cannot tell them apart: PyTorch's
# FlashAttention-2 on an H100 at head dim 128 runs the forward at 340 TFLOP/s and the backward at
# 298 (distattn.kernels.auto: the GPU report's torch row), and a backward block does 2.5x the FLOPs
BWD_ITER_RATIO = BWD_FLOPS_FACTOR * 340.0 / 298.0


@dataclass(frozen=True)
class Grid:
    """One direction's kernel: ``cta_rows`` rows of the grid's axis per CTA (forward: query rows;
    backward: keys), ``loop_rows`` of the other per iteration; a CTA's ``fixed`` cost in iterations;
    ``iter_s``: an iteration's seconds of an SM on a full GPU; ``lone``: an iteration on the longest
    CTA's critical path, in ``iter_s``."""

    cta_rows: int
    loop_rows: int
    fixed: float
    iter_s: float
    lone: float

    def work(self, grid_len, loop_len, area) -> tuple[np.ndarray, np.ndarray]:
        """Per segment (vectorised): the iterations of its CTAs on one head, fixed cost included, and
        its longest CTA's (``grid_len``: the rows of the grid's axis; ``loop_len``: of the loop's)."""
        grid_len, loop_len, area = (np.atleast_1d(np.asarray(x, dtype=np.float64)) for x in (grid_len, loop_len, area))
        ctas = np.ceil(grid_len / self.cta_rows)
        iters = area / (self.cta_rows * self.loop_rows) + self.fixed * ctas
        # the widest row of the grid's axis sees 2 area / grid_len of the loop's (a causal segment's
        # last row), at most all of them
        widest = np.minimum(loop_len, 2.0 * area / np.maximum(grid_len, 1.0))
        longest = np.where(area > 0, self.fixed + np.ceil(widest / self.loop_rows), 0.0)
        return np.where(area > 0, iters, 0.0), longest


@dataclass(frozen=True)
class TileModel:
    """The kernel's two directions (:class:`Grid`), the GPU's SMs, a call's fixed seconds (a
    launch, timed on an idle GPU; a busy stream hides it, so pricing leaves it out) and where the
    numbers come from."""

    forward: Grid
    backward: Grid
    sms: int = 132
    call_s: float = 0.0
    source: str = ""

    def grid(self, direction: str) -> Grid:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return self.forward if direction == "forward" else self.backward

    def _work(self, direction: str, q_len, k_len, area):
        g = self.grid(direction)
        return g, *(g.work(q_len, k_len, area) if direction == "forward" else g.work(k_len, q_len, area))

    def rank_seconds(self, direction: str, rank, q_len, k_len, area, ranks: int, heads: float) -> np.ndarray:
        """``[ranks]``: the seconds each rank's call of its segments (``rank, q_len, k_len, area`` per
        segment) takes on ``heads`` query heads, with no ``call_s`` (a busy stream hides it)."""
        g, iters, longest = self._work(direction, q_len, k_len, area)
        rank = np.atleast_1d(np.asarray(rank, dtype=np.int64))
        total = np.bincount(rank, iters, minlength=ranks)[:ranks]
        slowest = np.zeros(ranks)
        np.maximum.at(slowest, rank, longest)
        return np.maximum(g.iter_s * heads * total / self.sms, g.lone * g.iter_s * slowest)

    def segment_seconds(self, direction: str, q_len, k_len, area, heads: float) -> np.ndarray:
        """:meth:`rank_seconds` of each segment as a call of its own (vectorised)."""
        n = np.size(q_len)
        return self.rank_seconds(direction, np.arange(n), q_len, k_len, area, n, heads).reshape(np.shape(q_len))

    def task_seconds(self, q_len, k_len, area, heads: float) -> np.ndarray:
        """Forward plus backward seconds of tasks (vectorised) on ``heads`` query heads, as a share of
        a full GPU: what a task adds to its rank's calls (CAD's planner balances these; the critical
        path of a call, not of a task, is left out). Closed form: the planner asks it thousands of times."""
        f, b = self.forward, self.backward
        q, k, area = (np.asarray(x, dtype=np.float64) for x in (q_len, k_len, area))
        per = heads / self.sms
        seconds = per * (area * (f.iter_s / (f.cta_rows * f.loop_rows) + b.iter_s / (b.cta_rows * b.loop_rows))
                         + f.fixed * f.iter_s * np.ceil(q / f.cta_rows) + b.fixed * b.iter_s * np.ceil(k / b.cta_rows))
        return np.where(area > 0, seconds, 0.0)

    def document_tflops(self, direction: str, length, heads: float, head_dim: int) -> np.ndarray:
        """TFLOP/s of a causal document of ``length`` tokens as a call of its own on ``heads`` heads
        (vectorised in ``length``; no ``call_s``)."""
        length = np.asarray(length, dtype=np.float64)
        area = length * (length + 1) / 2
        flops = 4.0 * area * heads * head_dim * (BWD_FLOPS_FACTOR if direction == "backward" else 1.0)
        return flops / self.segment_seconds(direction, length, length, area, heads) / 1e12

    def at_level(self, fwd_tflops: float, bwd_tflops: float, head_dim: int, source: str,
                 length: int = 32768, heads: float = LATENCY_TABLE_HEADS) -> "TileModel":
        """This model with each direction's ``iter_s`` scaled so that a causal document of ``length``
        runs at the given TFLOP/s (the shape -- fixed cost, critical path -- kept)."""
        grids = {}
        for direction, target in zip(DIRECTIONS, (fwd_tflops, bwd_tflops)):
            g = self.grid(direction)
            speed = float(self.document_tflops(direction, length, heads, head_dim))
            grids[direction] = replace(g, iter_s=g.iter_s * speed / target)
        return replace(self, **grids, source=source)

    def describe(self) -> str:
        f, b = self.forward, self.backward
        return (f"tiles: a CTA's fixed cost {f.fixed:.1f} iterations, an iteration {f.iter_s * 1e6:.3f} us forward "
                f"/ {b.iter_s * 1e6:.3f} us backward on one of {self.sms} SMs, critical path x{f.lone:.2f}, "
                f"a call {self.call_s * 1e6:.1f} us")


def grids(fixed: float, fwd_iter_s: float, bwd_iter_s: float, lone: float) -> tuple[Grid, Grid]:
    """FlashAttention's forward (128 query rows x 64 keys) and backward (128 keys x 64 query rows) grids."""
    return Grid(128, 64, fixed, fwd_iter_s, lone), Grid(128, 64, fixed, bwd_iter_s, lone)


# ---- tables ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelRow:
    """One measured call: ``segments`` alike of ``q_len`` query rows against ``k_len`` keys (causal,
    bottom-right aligned), ``heads`` query heads, ``direction`` (forward, backward or both),
    ``seconds``; ``L, cp, tp`` as the table names the row (for a shape-named row: ``L = k_len``,
    ``cp = tp = 1`` unless given); ``backend``: the kernel timed, where the table says."""

    L: int
    cp: int
    tp: int
    q_len: int
    k_len: int
    heads: float
    direction: str
    seconds: float
    segments: int = 1
    backend: str = ""

    @property
    def area(self) -> int:
        q, k = self.q_len, self.k_len
        return q * (k - q) + q * (q + 1) // 2


def distca_shape(L: int, cp: int) -> tuple[int, int]:
    """DistCA's profiler's call for one CP rank of a document of ``L``: ``L // cp`` query rows against
    ``(1/2 + 1/(2 cp)) L`` keys (bottom-right aligned, the rank's average share of the causal pairs)."""
    return L // cp, int((0.5 + 0.5 / cp) * L)


def read_table(path: str | Path, table_heads: int = LATENCY_TABLE_HEADS) -> list[KernelRow]:
    """The rows of a latency table (module docstring); ``ValueError`` naming the file and what is wrong."""
    def bad(why: str):
        return ValueError(f"kernel table {path}: {why} (expected columns L, cp, tp, duration_per_doc in ms, or "
                          f"q_len, k_len, heads, direction, ms)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = list(csv.DictReader(f))
    except OSError as exc:
        raise ValueError(f"kernel table {path}: cannot read it ({exc.strerror or exc})") from None
    rows = []
    for i, r in enumerate(records, start=2):
        try:
            ms = float(r.get("ms") or r["duration_per_doc"])
            cp, tp = int(r.get("cp") or 1), int(r.get("tp") or 1)
            if r.get("q_len"):
                q, k = int(r["q_len"]), int(r["k_len"])
                L = int(r.get("L") or k)
            else:
                L = int(r["L"])
                q, k = distca_shape(L, cp)
            heads = float(r.get("heads") or table_heads / tp)
            direction = (r.get("direction") or "both").strip()
            segments = int(r.get("segments") or 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"line {i}: {type(exc).__name__}: {exc}") from None
        if direction not in (*DIRECTIONS, "both"):
            raise bad(f"line {i}: direction {direction!r} is not forward, backward or both")
        if not (ms > 0 and 0 < q <= k and heads > 0 and cp > 0 and tp > 0 and segments > 0):
            raise bad(f"line {i}: times, heads, cp, tp, segments must be > 0 and 0 < q_len <= k_len")
        rows.append(KernelRow(L, cp, tp, q, k, heads, direction, ms * 1e-3, segments, (r.get("backend") or "").strip()))
    if len(rows) < 4:
        raise bad(f"{len(rows)} rows; a fit needs at least 4")
    return rows


def predict(model: TileModel, rows: list[KernelRow]) -> np.ndarray:
    """Modelled seconds of each row's call (``call_s`` once per direction timed; vectorised over rows,
    each its own call)."""
    q, k, area, heads, segments = (np.asarray(x, dtype=np.float64) for x in
                                   zip(*((r.q_len, r.k_len, r.area, r.heads, r.segments) for r in rows)))
    out = np.zeros(len(rows))
    for direction in DIRECTIONS:
        timed = np.asarray([r.direction in (direction, "both") for r in rows])
        g, iters, longest = model._work(direction, q, k, area)
        out += timed * (model.call_s + np.maximum(g.iter_s * heads * segments * iters / model.sms,
                                                  g.lone * g.iter_s * longest))
    return out


# ---- fit ---------------------------------------------------------------------------------------
def fit(rows: list[KernelRow], sms: int = 132, source: str = "") -> TileModel:
    """The :class:`TileModel` that fits ``rows`` best (module docstring): least squares on
    ``log(modelled / measured)`` over the log of the parameters (Levenberg-Marquardt from a few
    starts; the best kept)."""
    measured = np.asarray([r.seconds for r in rows])
    apart = {r.direction for r in rows} >= set(DIRECTIONS)   # the directions timed apart: both iterations fitted

    def model(theta):
        call_s, fwd_s, fixed, lone, *bwd = (float(x) for x in np.exp(theta))
        return TileModel(*grids(fixed, fwd_s, bwd[0] if apart else BWD_ITER_RATIO * fwd_s, lone), sms, call_s,
                         source)

    def residual(theta):
        return np.log(predict(model(theta), rows) / measured)

    # an iteration's seconds from the slowest row as if it were all work (the starts only need its scale)
    big = max(range(len(rows)), key=lambda i: measured[i])
    r = rows[big]
    per_iter = measured[big] / (r.heads * r.area / 8192 * (1 + BWD_ITER_RATIO) / sms)
    best = None
    for fixed in (3.0, 10.0, 30.0):
        for lone in (0.3, 1.0, 3.0):
            start = [measured.min() / 2, per_iter, fixed, lone] + ([BWD_ITER_RATIO * per_iter] if apart else [])
            theta, cost = _levenberg_marquardt(residual, np.log(start))
            if best is None or cost < best[1]:
                best = (theta, cost)
    return model(best[0])


def _levenberg_marquardt(residual, theta: np.ndarray, steps: int = 200) -> tuple[np.ndarray, float]:
    """Minimise ``|residual(theta)|^2`` (a forward-difference Jacobian; the model has kinks, so a
    step that does not improve raises the damping instead)."""
    damping = 1e-2
    r = residual(theta)
    cost = float(r @ r)
    for _ in range(steps):
        jac = np.empty((len(r), len(theta)))
        for j in range(len(theta)):
            bumped = theta.copy()
            bumped[j] += 1e-6
            jac[:, j] = (residual(bumped) - r) / 1e-6
        a = jac.T @ jac
        g = jac.T @ r
        while damping < 1e8:
            step = np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-12), -g)
            trial = np.clip(theta + step, -60.0, 60.0)
            r_trial = residual(trial)
            c_trial = float(r_trial @ r_trial)
            if c_trial < cost:
                theta, r, damping = trial, r_trial, max(damping / 3, 1e-9)
                improved = cost - c_trial
                cost = c_trial
                break
            damping *= 4
        else:
            break
        if improved < 1e-12 * max(cost, 1e-30):
            break
    return theta, cost


# the fit to ../shared/data/profiles/attn_latency_h100.csv, every row (median error 4.3%, worst 24% on a
# 21-us row; tests/test_tiles.py refits it where the table is at hand)
H100 = TileModel(*grids(fixed=11.13, fwd_iter_s=0.8274e-6, bwd_iter_s=2.360e-6, lone=0.1777), sms=132,
                 call_s=7.62e-6, source="tiles fitted to attn_latency_h100.csv (FlashAttention on an H100, "
                                        "rows read as forward + backward)")


# a CPU's kernel: no CTAs to fill, no fixed cost -- its work is the pairs (the backward 2.5x the forward's)
PAIRS = TileModel(*grids(fixed=0.0, fwd_iter_s=1e-9, bwd_iter_s=BWD_FLOPS_FACTOR * 1e-9, lone=0.0), sms=1,
                  source="pairs (a CPU's kernel: no fixed cost per CTA)")


def check(model: TileModel, rows: list[KernelRow]) -> list[dict]:
    """Each row measured against modelled: ``L, cp, tp, q_len, k_len, heads, direction, measured_ms,
    model_ms, error`` (modelled / measured - 1)."""
    modelled = predict(model, rows)
    return [{"L": r.L, "cp": r.cp, "tp": r.tp, "q_len": r.q_len, "k_len": r.k_len, "heads": r.heads,
             "direction": r.direction, "measured_ms": r.seconds * 1e3, "model_ms": float(m) * 1e3,
             "error": float(m / r.seconds - 1)} for r, m in zip(rows, modelled)]


__all__ = ["BWD_ITER_RATIO", "DIRECTIONS", "H100", "LATENCY_TABLE_HEADS", "PAIRS", "Grid", "KernelRow", "TileModel",
           "check", "distca_shape", "fit", "grids", "predict", "read_table"]
