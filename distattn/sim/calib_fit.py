"""Fit ``simulate --calibrate``'s :class:`~distattn.sim.calibrate.Machine` to one bench's rows.

What a bench decides, and what it does not. A bench of the kind ``--calibrate`` expects (a few
world sizes, one long document and packed documents) decides ``flop_s`` (its one-document rows are
long tiles), ``net_scale`` (the ranks' waits), and how much dearer short segments are than long
ones -- but not *which* fixed cost makes them dearer: fits of two benches recorded minutes apart
traded a cost per fused call (``tile_s``) against one per step (``call_s``) and one per row
(``half_keys``) freely, and a bench of windows, whose tiles are many, then lands far off. So
``tile_s`` is measured apart, where nothing else is mixed in
(:func:`~distattn.sim.calibrate.measure_tile_seconds`: one thread's CPU time of calls on 16-token
segments), and :data:`FITTED` are fitted: ``flop_s``, ``half_keys``, ``call_s``, ``net_scale``
(and ``background`` where the bench did not measure the CPU other processes took). ``cores`` is the
machine's; the copy rate a nominal figure (the copies are under 1% of a row).

The fit is damped Gauss-Newton (Levenberg-Marquardt) on the log of each row's predicted / measured
step time, so a row counts by its relative error whatever its length, with Huber weights (rows off
by more than :data:`HUBER` in log count linearly: on a shared machine a row some other job slowed
must not pull the model), each parameter in log space within :data:`BOUNDS`. A bench only ever
measures a forward plus a backward, so nothing in it tells the two apart: a fixed cost is the same
each direction and the backward's FLOPs (2.5x the forward's) run at the forward's rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .calibrate import Machine, RowCase, predict_case

# what a fit may move, and where it stops (physically sensible ranges, wide)
BOUNDS = {"flop_s": (1e8, 1e13), "half_keys": (1.0, 1e5), "tile_s": (1e-7, 0.1), "call_s": (1e-7, 1.0),
          "cores": (0.25, 256.0), "background": (1e-3, 64.0), "net_scale": (0.02, 50.0)}
FITTED = ("flop_s", "half_keys", "call_s", "net_scale")
START = Machine(flop_s=3e10, half_keys=256.0, tile_s=2e-4, call_s=1e-3, cores=2.0, net_scale=1.0)
HUBER = 0.1   # |log error| beyond which a row's weight falls off as 1 / |error|


@dataclass(frozen=True)
class Fit:
    """The fitted machine, its rows' log errors and the iterations it took."""

    machine: Machine
    log_errors: np.ndarray
    iterations: int


def _machine(x: np.ndarray, base: Machine, names) -> Machine:
    return replace(base, **{n: float(np.exp(v)) for n, v in zip(names, x)})


def log_errors(cases: list[RowCase], machine: Machine) -> np.ndarray:
    """``log(predicted / measured)`` of every row."""
    return np.log([predict_case(c, machine)[0] / c.row["fwd_bwd_ms"] for c in cases])


def _loss(r: np.ndarray) -> float:
    a = np.abs(r)
    return float(np.sum(np.where(a <= HUBER, 0.5 * a * a, HUBER * (a - 0.5 * HUBER))))


def _jacobian(f, x: np.ndarray, r0: np.ndarray, hi: np.ndarray, step: float = 0.05) -> np.ndarray:
    """Forward differences in log space; a step of 5% smooths the replay's kinks (which rank is the
    slowest, when a transfer lands)."""
    cols = []
    for i in range(len(x)):
        h = step if x[i] + step <= hi[i] else -step
        y = x.copy()
        y[i] += h
        cols.append((f(y) - r0) / h)
    return np.stack(cols, axis=1)


def _fitted_names(cases: list[RowCase]) -> tuple[str, ...]:
    """:data:`FITTED`, and ``background`` unless every row measured what other processes took."""
    measured = all(math.isfinite(c.row.get("cpu_others", math.nan)) for c in cases)
    return FITTED if measured else (*FITTED, "background")


def fit_machine(cases: list[RowCase], start: Machine = START, names=None, iters: int = 40) -> Fit:
    """:class:`Machine` parameters ``names`` (default :func:`_fitted_names`) fitted to ``cases``
    (module docstring); the others as in ``start``."""
    if not cases:
        raise ValueError("no bench rows to fit: give a results.csv with multi-rank rows")
    names = _fitted_names(cases) if names is None else tuple(names)
    lo, hi = (np.log([BOUNDS[n][i] for n in names]) for i in (0, 1))
    x = np.clip(np.log([getattr(start, n) or 1.0 for n in names]), lo, hi)   # (a background of 0: start at 1)

    def f(y):
        return log_errors(cases, _machine(y, start, names))
    r, damping, it = f(x), 1e-2, 0
    for it in range(1, iters + 1):
        w = np.sqrt(np.minimum(1.0, HUBER / np.maximum(np.abs(r), 1e-12)))   # Huber, as least squares
        jac = _jacobian(f, x, r, hi) * w[:, None]
        grad, normal = jac.T @ (w * r), jac.T @ jac
        before, improved = _loss(r), False
        while damping < 1e8 and not improved:
            y = np.clip(x + np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-9), -grad), lo, hi)
            ry = f(y)
            improved = _loss(ry) < before
            if improved:
                x, r, damping = y, ry, max(damping / 3, 1e-6)
            else:
                damping *= 4
        if not improved or before - _loss(r) < 1e-5 * before:
            break
    return Fit(_machine(x, start, names), r, it)
