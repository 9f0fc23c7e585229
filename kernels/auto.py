"""What ``backend="auto"`` runs on CUDA, per direction: a table of measured kernel speeds.

Numbers only: this module imports no kernel. :func:`choose` answers, for a GPU architecture, a head
dim and a direction (``"fwd"``: the forward; ``"bwd"``: the backward), which backend the table
measured faster; :mod:`distattn.kernels.registry` asks it on every ``auto`` call that both kernels
can take (PyTorch's FlashAttention takes only some: fp16/bf16, one head dim, a multiple of 8 up to
256, no soft-cap, a band its window can express, and no backward in deterministic mode; the registry
checks those, then asks here).

The rule, :func:`choose` ``(arch, head_dim, direction)``:

* the rows of that ``arch`` (``major * 10 + minor``: 90 for H100/H200) and direction;
* none (A100 ``sm_80``, Blackwell, any GPU nobody measured): ``"triton"``, what ``auto`` always ran;
* else the row with the largest measured head dim ``<= head_dim`` (the smallest row when
  ``head_dim`` is below every row), and that row's faster backend (``"triton"`` on a tie).

So at arch 90: the forward runs ``triton`` at every head dim; the backward runs ``triton`` below
head dim 128 and ``torch`` (FlashAttention-2) from 128 on.

Adding a row: on the GPU, run ``bash scripts/gpu_report.sh REPORT.md`` (it runs
``python -m distattn.kernels.bench``: TFLOP/s of ``triton`` and ``torch`` for the forward and for
forward+backward, bf16, causal), then add a :class:`_Report` entry below with the report's
numbers and a ``source`` naming the GPU, the torch and triton versions, the shape and the report.
The backward's speed is derived from the forward's and forward+backward's (:func:`derived_bwd`),
so the table's two directions come from the bench's two columns. Keep one report per arch: rows
from different software versions compare numbers measured under different conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

from distattn.costmodel.cost import BWD_FLOPS_FACTOR

DIRECTIONS = ("fwd", "bwd")
DEFAULT = "triton"  # what auto runs where nothing was measured (and on ties)
# FLOPs of the backward and of forward + backward, in forward FLOPs (the backward's five matmuls to
# the forward's two)
BWD_FLOPS, FWD_BWD_FLOPS = BWD_FLOPS_FACTOR, 1 + BWD_FLOPS_FACTOR


@dataclass(frozen=True)
class Measured:
    """One row: TFLOP/s of each backend at ``(arch, head_dim, direction)`` and where they come from.

    ``arch``: compute capability as ``major * 10 + minor`` (90: sm_90, H100/H200). ``direction``:
    ``"fwd"`` or ``"bwd"``. ``tflops``: ``(backend, TFLOP/s)`` pairs, one per backend measured.
    ``source``: the machine, software and command the numbers came from (and, for a derived number,
    how it was derived)."""

    arch: int
    head_dim: int
    direction: str
    tflops: tuple[tuple[str, float], ...]
    source: str

    @property
    def faster(self) -> str:
        """The backend with the most TFLOP/s; :data:`DEFAULT` wins a tie (it is what auto ran before)."""
        best = max(speed for _, speed in self.tflops)
        winners = [name for name, speed in self.tflops if speed == best]
        return DEFAULT if DEFAULT in winners else winners[0]


def derived_bwd(fwd: float, fwd_bwd: float) -> float:
    """The backward's TFLOP/s from the forward's and forward+backward's: the time of the backward's
    2.5 forward-FLOPs is the time of forward+backward (3.5) less the forward's (1)."""
    return BWD_FLOPS / (FWD_BWD_FLOPS / fwd_bwd - 1.0 / fwd)


@dataclass(frozen=True)
class _Report:
    """One GPU report's kernel numbers: per head dim, per backend, (forward, forward+backward) TFLOP/s."""

    arch: int
    source: str
    speeds: tuple[tuple[int, tuple[tuple[str, float, float], ...]], ...]

    def rows(self) -> list[Measured]:
        out = []
        for head_dim, backends in self.speeds:
            out.append(Measured(self.arch, head_dim, "fwd", tuple((b, f) for b, f, _ in backends),
                                f"{self.source}: forward, measured"))
            out.append(Measured(self.arch, head_dim, "bwd", tuple((b, derived_bwd(f, fb)) for b, f, fb in backends),
                                f"{self.source}: backward, derived from the measured forward and forward+backward "
                                f"as {BWD_FLOPS} / ({FWD_BWD_FLOPS} / fwd_bwd - 1 / fwd)"))
        return out


_REPORTS = (
    _Report(90, "H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, bf16, 32K tokens causal, "
                "`python -m distattn.kernels.bench` in scripts/gpu_report.sh, stop 50 report (code 652f699: the "
                "triton backward before issue 46 rewrote dK/dV; measure it again)",
            # head dim: (backend, forward TFLOP/s, forward+backward TFLOP/s)
            ((64, (("triton", 389.0, 337.0), ("torch", 298.0, 295.0))),
             (128, (("triton", 435.0, 272.0), ("torch", 340.0, 309.0))))),
)

TABLE: tuple[Measured, ...] = tuple(row for report in _REPORTS for row in report.rows())


def rows_at(arch: int, direction: str, table: tuple[Measured, ...] = TABLE) -> list[Measured]:
    """The rows of ``arch`` and ``direction``, by head dim."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return sorted((r for r in table if r.arch == arch and r.direction == direction), key=lambda r: r.head_dim)


def choose(arch: int, head_dim: int, direction: str, table: tuple[Measured, ...] = TABLE) -> str:
    """The backend the table measured faster for ``direction`` (``"fwd"``/``"bwd"``) at ``head_dim`` on
    ``arch`` (``major * 10 + minor``), by the module's rule; :data:`DEFAULT` where ``arch`` has no row."""
    rows = rows_at(arch, direction, table)
    if not rows:
        return DEFAULT
    below = [r for r in rows if r.head_dim <= head_dim]
    return (below[-1] if below else rows[0]).faster


def choices(arch: int, table: tuple[Measured, ...] = TABLE) -> set[str]:
    """Every backend :func:`choose` may return at ``arch`` (the ones a plan must prepare)."""
    return {DEFAULT} | {r.faster for r in table if r.arch == arch}
