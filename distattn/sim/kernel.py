"""The attention kernel's speed in the simulator: measured TFLOP/s by query-segment length, forward and
backward -- not a fixed efficiency.

A varlen kernel runs each segment (a document's rows on a rank, a CAD task, a whole document after
Ulysses' head exchange) as its own tiles: short segments leave tiles part-empty and pay a fixed cost
per row of tiles, so 2K-token documents run at a fraction of a 32K one's speed. :class:`AttentionKernel`
answers ``tflops(direction, length)`` for a causal document of ``length`` tokens;
:meth:`AttentionKernel.rank_rates` turns a schedule's segments
(:meth:`distattn.schedule.Schedule.kernel_segments`) into each rank's FLOP/s: its attention FLOPs
over the seconds its segments take, each at the speed of the causal document whose rows see as many
keys on average (:func:`equivalent_length`: ``2 * pairs / query rows``). What a row of tiles costs
beyond its work is spread over the keys it runs through, so a segment of few query rows against a
long key prefix -- the last chunk of a long document on a ring rank, or a CAD task -- runs at the
long document's speed, not at a short one's (until issue 65 the speed was read at the segment's
query rows alone, which priced such segments as short documents: ``cad``'s step at 256 GPUs / 512K
on ProLong came out ~30% slower than with a flat kernel, Ulysses' unchanged).

Where the numbers come from (:meth:`AttentionKernel.measured`):

* **the level**: our own kernels on an H100 at 32K tokens, causal, bf16 -- the GPU report's table
  (``distattn.kernels.auto``: ``scripts/gpu_report.sh``), the faster backend per direction, as
  ``backend="auto"`` runs them (head dim 128: forward 435 TFLOP/s, backward 298). sm_90 parts (H100,
  H200, H800, GH200) share it; other GPUs scale it by their dense peak.
* **the shape over length**: a measured latency table of causal documents per length
  (``attn_latency_h100.csv``: ``L, cp, tp, duration_per_doc`` in ms; its ``cp = tp = 1`` rows),
  each length's pairs per second relative to 32K's. That table times one kernel call per document:
  its shortest documents (64 tokens, 28 us; 128 tokens, 30 us) are a call's fixed cost, which a varlen
  call over many segments pays once, not per segment. So the fixed cost (the shortest row's time) is
  taken off every row before its speed is read, and the shortest row itself is left out; shorter
  segments run at the next row's speed. Without a table the speed is flat in length (the row's
  ``kernel`` source says so).
* **the heads per call** (:class:`HeadTerm`, :func:`latency_heads`): the same table's ``cp = 1, tp > 1``
  rows time each document on ``1/tp`` of the heads (``H / tp`` query heads, ``max(1, Hkv / tp)`` KV
  heads). Per length, the speed per FLOP on ``H / tp`` heads over the speed on all ``H``, each row's
  own fixed cost taken off as above: ``(t_1 - f_1) / (tp (t_tp - f_tp))``. A Ulysses rank runs
  ``Hq / degree`` heads per call (``ulysses``: the whole CP group; ``usp``: its Ulysses degree; both
  ``/ head_groups``), a TP rank ``1/tp`` of them; the ring family, the all-gather and CAD all of them
  (:meth:`~distattn.schedule.Schedule.kernel_heads`). What the table says (``H = 32``, Llama-3 8B's 32
  query / 8 KV heads, as the simulator reads it -- the table does not record its model: if it was
  timed at 64 heads, every head count below doubles): per FLOP, fewer heads cost at most 3.3% (4
  heads at 16K), under 2% elsewhere; a Ulysses step at CP 32 moves by well under that (its linear
  layers and transfers do not) --

  ====================  ======  ======  ======  ======  ======  ======
  heads per call        2K      4K      8K      16K     32K     64K
  ====================  ======  ======  ======  ======  ======  ======
  32 (all)              1       1       1       1       1       1
  16 (tp 2)             1       0.995   1       1       0.990   0.995
  8 (tp 4)              1       0.995   1       1       0.990   0.983
  4 (tp 8) and fewer    1       0.995   1       0.967   0.986   0.983
  ====================  ======  ======  ======  ======  ======  ======

  (measured, capped at 1 and kept monotone in heads: a call on fewer heads never runs faster per FLOP
  than one on more). One head -- Ulysses at CP 32 on Llama-3 8B -- is below the table's fewest (4):
  it takes 4's term, not an extrapolation; more heads than the table's take all-heads' 1. Lengths
  below 2K take 2K's term: there the table's per-call fixed cost is over half a row's time on 1/8 of
  the heads, too much of it to read a per-FLOP speed from (the raw times' ratios there -- 0.50 at 1K
  on 4 heads, 0.90 at 4K -- are that fixed cost, which a varlen call pays once, not per segment: one
  call per document, as the table times, would pay it per document). The level is
  the GPU report's at 16 heads (hidden 2048 / head dim 128), in the term's flat range. The GPU report
  also times 1, 4 and 32 heads per call on one GPU (``--heads``, :mod:`distattn.kernels.tools.bench`),
  at equal work per call, as a Ulysses rank runs them.

CAD's planner balances with a roofline at the kernel's 32K forward speed (``attn_efficiency`` of
the peak, :func:`planner_efficiency`): it prices every pair alike. (Its placement does not balance
under a cost that varies with the segment length -- :class:`distattn.cost.ProfileCost` leaves the
FLOPs 5x imbalanced at 64 ranks -- so it is not given one.)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model_shape import GPU, GPUS

REFERENCE_LEN = 32768           # the length the GPU report measures its TFLOP/s at
SM90 = ("h100", "h100-pcie", "h200", "h800", "gh200")
LATENCY_TABLE_HEADS = 32        # the query heads attn_latency_h100.csv's tp = 1 rows are read as (module docstring)


@dataclass(frozen=True)
class HeadTerm:
    """A kernel's speed per FLOP with ``heads`` query heads per call over its speed with all of them
    (the last row), per length: ``speed[i][j]`` at ``heads[i]`` and ``lengths[j]`` (module docstring)."""

    heads: tuple[float, ...]
    lengths: tuple[float, ...]
    speed: tuple[tuple[float, ...], ...]
    source: str

    def __post_init__(self):
        if not self.heads or not self.lengths or len(self.speed) != len(self.heads) \
                or any(len(row) != len(self.lengths) for row in self.speed):
            raise ValueError(f"head term {self.source}: one speed per head count and length")
        if list(self.heads) != sorted(set(self.heads)) or list(self.lengths) != sorted(set(self.lengths)) \
                or min(self.heads) <= 0 or min(self.lengths) <= 0:
            raise ValueError(f"head term {self.source}: head counts and lengths must be > 0 and increasing")
        if not all(0 < x <= 1 for row in self.speed for x in row) or any(x != 1 for x in self.speed[-1]):
            raise ValueError(f"head term {self.source}: relative speeds must be in (0, 1], and 1 on all heads")

    def factor(self, heads: float, length) -> np.ndarray:
        """The relative speed of a call on ``heads`` query heads at causal-document ``length``
        (vectorised in length), log-interpolated in both; outside the table it takes the nearest
        measured head count and length (fewer heads than measured: the fewest's term, never
        extrapolated; more: all heads', 1)."""
        if not heads > 0:
            raise ValueError(f"heads per call must be > 0, got {heads!r}")
        x = np.log(np.clip(np.asarray(length, dtype=np.float64), 1.0, None))
        rows = [np.interp(x, np.log(self.lengths), np.log(row)) for row in self.speed]
        t = float(np.interp(np.log(heads), np.log(self.heads), np.arange(len(self.heads))))
        i = int(np.floor(t))
        w = t - i
        return np.exp((1 - w) * rows[i] + w * rows[min(i + 1, len(rows) - 1)])


@dataclass(frozen=True)
class AttentionKernel:
    """TFLOP/s per direction at query-segment lengths ``lengths`` (log-interpolated, flat outside), on
    all heads; ``heads_term`` scales it by the query heads per call (None: no such term, 1)."""

    lengths: tuple[float, ...]
    fwd_tflops: tuple[float, ...]
    bwd_tflops: tuple[float, ...]
    source: str
    heads_term: HeadTerm | None = None

    def __post_init__(self):
        n = len(self.lengths)
        if n < 1 or len(self.fwd_tflops) != n or len(self.bwd_tflops) != n:
            raise ValueError("a kernel table needs one forward and one backward TFLOP/s per length")
        if min(self.fwd_tflops) <= 0 or min(self.bwd_tflops) <= 0 or list(self.lengths) != sorted(self.lengths):
            raise ValueError(f"kernel table {self.source}: speeds must be > 0 and lengths increasing")

    @staticmethod
    def flat(fwd_tflops: float, bwd_tflops: float, source: str) -> "AttentionKernel":
        return AttentionKernel((float(REFERENCE_LEN),), (float(fwd_tflops),), (float(bwd_tflops),), source)

    def tflops(self, direction: str, length, heads: float | None = None) -> np.ndarray:
        """TFLOP/s on a causal document of ``length`` tokens (vectorised; a segment's:
        :func:`equivalent_length`); ``direction``: forward|backward; ``heads``: query heads per call
        (:meth:`HeadTerm.factor`; None: all heads, as without a head term)."""
        table = self.fwd_tflops if direction == "forward" else self.bwd_tflops
        x = np.log(np.clip(np.asarray(length, dtype=np.float64), 1.0, None))
        speed = np.exp(np.interp(x, np.log(self.lengths), np.log(table)))
        if heads is None or self.heads_term is None:
            return speed
        return speed * self.heads_term.factor(heads, length)

    def rank_rates(self, segments, ranks: int, direction: str, flops_per_pair: float,
                   heads: float | None = None) -> np.ndarray:
        """``[ranks]`` FLOP/s: each rank's attention FLOPs over the seconds its segments take, each at
        the speed of a causal document whose rows see as many keys on average, on ``heads`` query heads
        per call (``segments``: ``(rank, q_len, area)``; ``heads``:
        :meth:`~distattn.schedule.Schedule.kernel_heads`, None: all; module docstring); a rank with
        none gets the best."""
        rank, _, area = (np.asarray(x) for x in segments)
        seconds = self.rank_seconds(segments, ranks, direction, flops_per_pair, heads)
        total = np.bincount(rank, area.astype(np.float64) * flops_per_pair, minlength=ranks)
        best = max(self.fwd_tflops if direction == "forward" else self.bwd_tflops) * 1e12
        return np.where(seconds > 0, total / np.where(seconds > 0, seconds, 1.0), best)

    def rank_seconds(self, segments, ranks: int, direction: str, flops_per_pair: float,
                     heads: float | None = None) -> np.ndarray:
        """``[ranks]`` seconds each rank's segments take (:meth:`rank_rates`' arguments)."""
        rank, q_len, area = (np.asarray(x) for x in segments)
        flops = area.astype(np.float64) * flops_per_pair
        speed = self.tflops(direction, equivalent_length(q_len, area), heads)
        return np.bincount(rank, flops / (speed * 1e12), minlength=ranks)

    @staticmethod
    def measured(gpu: GPU, head_dim: int, latency_csv: str | Path | None = None,
                 efficiency: float = 0.5) -> "AttentionKernel":
        """The level of our kernels at 32K (module docstring) on ``gpu`` at ``head_dim``, shaped over
        length by ``latency_csv`` when given, and over the heads per call by its ``tp > 1`` rows where
        it has them: the sm_90 report's speed, scaled by the dense peak on another GPU; ``efficiency``
        of the GPU's peak where the report has no row at all."""
        from ..kernels.auto import rows_at

        levels, where = [], []
        for direction in ("fwd", "bwd"):
            rows = rows_at(90, direction)
            below = [r for r in rows if r.head_dim <= head_dim] or rows[:1]
            if not rows:
                levels.append(efficiency * gpu.peak_tflops)
                continue
            row = below[-1]
            speed = max(s for _, s in row.tflops)
            levels.append(speed if gpu.name in SM90 else speed * gpu.peak_tflops / GPUS["h100"].peak_tflops)
            where.append(f"{direction} {speed:.0f} TFLOP/s at hd {row.head_dim}")
        source = f"GPU report ({', '.join(where)}; 32K causal){'' if gpu.name in SM90 else f', scaled to {gpu.name}'}"
        if latency_csv is None:
            return AttentionKernel.flat(*levels, source=source + ", flat in length")
        lengths, shape = latency_shape(latency_csv)
        heads = latency_heads(latency_csv)
        return AttentionKernel(tuple(lengths), tuple(levels[0] * shape), tuple(levels[1] * shape),
                               f"{source}, shaped by {Path(latency_csv).name}"
                               + (f" (and by heads per call: {heads.source})" if heads else ""), heads)


def equivalent_length(q_len, area) -> np.ndarray:
    """The causal document length whose rows see, on average, as many keys as a segment's of ``q_len``
    query rows and ``area`` visible pairs: ``2 * area / q_len`` (a causal document of ``L`` tokens has
    ``L (L + 1) / 2`` pairs). A whole causal document is its own length; a few query rows against a
    long key prefix (a ring's, or a CAD task at a long document's end) run as that prefix's document."""
    q_len = np.asarray(q_len, dtype=np.float64)
    return np.where(q_len > 0, 2.0 * np.asarray(area, dtype=np.float64) / np.maximum(q_len, 1.0), 1.0)


def planner_efficiency(kernel: AttentionKernel, gpu: GPU) -> float:
    """The fraction of ``gpu``'s peak the kernel's forward reaches on long segments (CAD's roofline)."""
    return float(kernel.tflops("forward", REFERENCE_LEN)) / gpu.peak_tflops


def _by_tp(path: str | Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A latency table's ``cp = 1`` rows per ``tp``: ``(lengths, seconds)``, by length."""
    out: dict[int, list] = {}
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("cp") == "1":
                    out.setdefault(int(r["tp"]), []).append((float(r["L"]), float(r["duration_per_doc"]) * 1e-3))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"--kernel-table {path}: expected a CSV with columns L, cp, tp, duration_per_doc (ms) "
                         f"({type(exc).__name__}: {exc})") from None
    tables = {tp: np.asarray(sorted(rows), dtype=np.float64).T for tp, rows in out.items()}
    if any(tp < 1 or (t <= 0).any() for tp, t in tables.items()):
        raise ValueError(f"--kernel-table {path}: tp, L and the durations must be positive")
    return {tp: (t[0], t[1]) for tp, t in tables.items()}


def _enough(path: str | Path, tp: int, seconds: np.ndarray) -> None:
    """``ValueError`` unless ``tp``'s rows can give a speed: >= 3 of them, the shortest the fixed cost."""
    if len(seconds) < 3:
        raise ValueError(f"--kernel-table {path}: needs >= 3 rows with cp=1, tp={tp} (the shortest is the fixed cost)")
    if tp == 1 and (seconds[1:] <= seconds[0]).any():
        raise ValueError(f"--kernel-table {path}: a longer document takes no longer than the shortest one")


def latency_shape(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, relative speed)`` from a latency table's ``cp = tp = 1`` rows: each length's causal
    pairs per second over the speed at :data:`REFERENCE_LEN` (interpolated)."""
    lengths, seconds = _by_tp(path).get(1, (np.zeros(0), np.zeros(0)))
    _enough(path, 1, seconds)
    # the shortest document's time is a call's fixed cost (module docstring)
    lengths, seconds = lengths[1:], seconds[1:] - seconds[0]
    speed = lengths * (lengths + 1) / 2 / seconds
    ref = np.exp(np.interp(np.log(REFERENCE_LEN), np.log(lengths), np.log(speed)))
    return lengths, speed / ref


def latency_heads(path: str | Path, table_heads: int = LATENCY_TABLE_HEADS) -> HeadTerm | None:
    """The :class:`HeadTerm` of a latency table's ``cp = 1`` rows, ``tp`` being ``table_heads / tp``
    query heads per call (module docstring); None when it has no ``tp > 1`` rows. Each ``tp``'s shortest
    row is its fixed cost, taken off its other rows; only lengths where every ``tp`` has a row taking
    at least twice its fixed cost are read (below, the fixed cost swamps the work). Speeds above
    all-heads' are capped at 1, and a head count's at the next larger one's (monotone in heads)."""
    tables = _by_tp(path)
    if 1 not in tables or len(tables) < 2:
        return None
    for tp, (_, seconds) in tables.items():
        _enough(path, tp, seconds)
    if max(tables) > table_heads:
        raise ValueError(f"--kernel-table {path}: tp={max(tables)} splits more than the {table_heads} heads "
                         f"the table is read at")
    common = set.intersection(*(set(lengths.tolist()) for lengths, _ in tables.values()))
    lengths = np.asarray(sorted(L for L in common if all(
        seconds[lens == L][0] >= 2 * seconds[0] for lens, seconds in tables.values())))
    if not len(lengths):
        raise ValueError(f"--kernel-table {path}: no length where every tp's document takes twice its fixed cost")

    def work(tp):   # seconds at ``lengths`` less the fixed cost (the shortest row's)
        lens, seconds = tables[tp]
        return np.asarray([seconds[lens == L][0] for L in lengths]) - seconds[0]

    splits = sorted(tables, reverse=True)                     # fewest heads first
    speed = [np.minimum(work(1) / (tp * work(tp)), 1.0) for tp in splits]
    for i in range(len(speed) - 2, -1, -1):                   # never faster than with more heads
        speed[i] = np.minimum(speed[i], speed[i + 1])
    return HeadTerm(tuple(table_heads / tp for tp in splits), tuple(lengths.tolist()),
                    tuple(tuple(row.tolist()) for row in speed),
                    f"{Path(path).name} tp {', '.join(map(str, sorted(tables)))} as {table_heads} heads / tp")


__all__ = ["AttentionKernel", "HeadTerm", "latency_heads", "latency_shape", "planner_efficiency",
           "LATENCY_TABLE_HEADS", "REFERENCE_LEN"]
