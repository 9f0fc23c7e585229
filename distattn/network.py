"""Network profiles: measured collective times and the alpha-beta model fitted to them.

A profile is a list of measurements ``(op, world_size, size_bytes, time_us)`` with nccl-tests'
size convention: ``size`` is the whole buffer -- the gathered output of ``all_gather``, the input of
``reduce_scatter``, each rank's send buffer of ``all_to_all``, the message of ``send_recv`` (every rank
sends ``size`` to the next and receives from the previous one). Sources: ``distattn cluster probe``
(torch.distributed), ``distattn cluster nccl-tests``, or a CSV like ``nccl_perf_h100.csv``.

Per ``(op, world_size)`` the fit is ``t = alpha + factor(op, n) * size / busbw`` (least squares),
``factor`` being nccl-tests' bus-bandwidth factor: ``(n-1)/n`` for all_gather, reduce_scatter and
all_to_all, ``2(n-1)/n`` for all_reduce, 1 for send_recv. A line fitted to latency-bound sizes
can have a slope far steeper than any measured bandwidth, so the fit never predicts more than
was measured: its ``busbw`` is capped at the largest measured bus bandwidth (``capped`` says so,
``fit_busbw_gbs`` keeps the least-squares figure), no size is predicted faster than that bandwidth,
and sizes beyond the largest measured one add time at ``busbw``. ``max_rel_err``/``rms_rel_err``
are the prediction's relative error over the measured points. :meth:`NetworkProfile.time` answers for
any size and world size: the fit of that world size, else the nearest measured one, with ``alpha``
scaled by the number of ring steps; an op the profile lacks borrows another's fit (all_gather
first: all_to_all and send_recv move as many bytes per link); a collective spanning more than ``gpus_per_node`` ranks is
capped at the inter-node bus bandwidth when the profile has no measurement that large.

JSON form (what ``probe`` and ``nccl-tests`` write)::

    {"source": str, "backend": str, "gpus_per_node": int,
     "inter_node": {"alpha_us": float, "busbw_gbs": float},
     "rows": [{"op", "world_size", "size_bytes", "time_us", "algbw_gbs", "busbw_gbs"}, ...],
     "fits": [{"op", "world_size", "alpha_us", "busbw_gbs", "points", "fit_busbw_gbs", "capped",
               "max_bus_bytes", "max_rel_err", "rms_rel_err"}, ...]}
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

OPS = ("all_gather", "reduce_scatter", "all_to_all", "send_recv", "all_reduce")
_PROXIES = ("all_gather", "reduce_scatter", "all_to_all", "send_recv", "all_reduce")
_ALIASES = {"alltoall": "all_to_all", "sendrecv": "send_recv", "allgather": "all_gather",
            "reducescatter": "reduce_scatter", "allreduce": "all_reduce"}


def parse_size(token: str, what: str) -> int:
    """``4K``, ``16M``, ``1G`` (powers of 1024) or a plain number; ``ValueError`` names ``what``."""
    tok = token.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(tok[-1:], 1)
    try:
        return int(float(tok[:-1] if mult > 1 else tok) * mult)
    except ValueError:
        raise ValueError(f"{what}: {token.strip()!r} is not a size like 4K, 16M or 1048576") from None


def bus_factor(op: str, n: int) -> float:
    if op == "send_recv" or n <= 1:
        return 1.0
    return (2.0 if op == "all_reduce" else 1.0) * (n - 1) / n


def canonical_op(op: str) -> str:
    if not isinstance(op, str):
        raise ValueError(f"a collective is named by a string (one of {', '.join(OPS)}), got {op!r}")
    name = _ALIASES.get(op.lower().replace("_perf", ""), op.lower().replace("_perf", ""))
    if name not in OPS:
        raise ValueError(f"unknown collective {op!r}; expected one of {', '.join(OPS)}")
    return name


@dataclass(frozen=True)
class Measurement:
    op: str
    world_size: int
    size_bytes: int
    time_us: float

    def __post_init__(self):
        # every source (probe, nccl-tests, JSON, CSV) comes through here: a corrupt figure stops at the door
        where = f"{self.op} on {self.world_size} ranks, {self.size_bytes} B"
        if self.world_size < 1 or self.size_bytes < 0:
            raise ValueError(f"{where}: world_size must be >= 1 and size_bytes >= 0")
        if not (math.isfinite(self.time_us) and self.time_us > 0):
            raise ValueError(f"{where}: time_us is {self.time_us}; a measured time must be positive and finite")

    def row(self) -> dict:
        algbw = self.size_bytes / (self.time_us * 1e3)  # GB/s
        return {"op": self.op, "world_size": self.world_size, "size_bytes": self.size_bytes,
                "time_us": self.time_us, "algbw_gbs": algbw,
                "busbw_gbs": algbw * bus_factor(self.op, self.world_size)}


@dataclass(frozen=True)
class Fit:
    """``t = alpha + x / fit_busbw`` for bus bytes ``x = factor * size`` up to ``max_bus_bytes``, never
    faster than ``busbw``; beyond ``max_bus_bytes`` the extra bytes move at ``busbw``. A fit made by
    hand (``Fit(alpha, busbw, points)``) is the plain line."""

    alpha_us: float
    busbw_gbs: float                      # the bandwidth predictions use: <= the largest measured
    points: int
    fit_busbw_gbs: float | None = None    # least-squares slope, when above busbw_gbs
    max_bus_bytes: float = math.inf       # the largest measured factor * size
    max_rel_err: float | None = None      # |predicted / measured - 1| over the measured points
    rms_rel_err: float | None = None

    @property
    def capped(self) -> bool:
        return self.fit_busbw_gbs is not None and self.fit_busbw_gbs > self.busbw_gbs

    def _bus_time(self, x: np.ndarray) -> np.ndarray:
        cap = self.busbw_gbs * 1e9
        slope = (self.fit_busbw_gbs or self.busbw_gbs) * 1e9
        line = np.maximum(self.alpha_us * 1e-6 + np.minimum(x, self.max_bus_bytes) / slope,
                          np.minimum(x, self.max_bus_bytes) / cap)
        return line + np.maximum(x - self.max_bus_bytes, 0) / cap

    def time_s(self, op: str, n: int, size_bytes) -> np.ndarray:
        size = np.asarray(size_bytes, dtype=np.float64)
        return self._bus_time(bus_factor(op, n) * size) * (size > 0)

    def describe(self) -> str:
        """``alpha ... us  busbw ... GB/s  (N sizes, fit error ...)``, and the cap when there is one."""
        notes = [f"{self.points} sizes"]
        if self.max_rel_err is not None:
            notes.append(f"fit error max {self.max_rel_err:.1%} rms {self.rms_rel_err:.1%}")
        if self.capped:
            notes.append(f"capped at the best measured; least squares gave {self.fit_busbw_gbs:.3f} GB/s")
        return f"alpha {self.alpha_us:9.1f} us  busbw {self.busbw_gbs:9.3f} GB/s  ({', '.join(notes)})"


def fit_alpha_beta(op: str, n: int, sizes, times_us) -> Fit:
    """Least squares ``t = alpha + factor * size / busbw``; alpha >= 0, weighted by 1/t so small
    and large messages count alike (relative error). The bandwidth is then capped at the largest
    measured one (see :class:`Fit`) and the fit's error over the points reported."""
    x = np.asarray(sizes, dtype=np.float64) * bus_factor(op, n)
    t = np.asarray(times_us, dtype=np.float64) * 1e-6
    if len(x) == 0:
        raise ValueError(f"no measurements of {op} on {n} ranks to fit")
    measured_bw = float(np.max(x / t))
    if measured_bw <= 0:  # only empty messages: nothing says how fast bytes move
        raise ValueError(f"the measurements of {op} on {n} ranks are all of size 0; measure non-empty messages")
    if len(x) == 1 or np.ptp(x) == 0:
        alpha, bw = 0.0, float(x.max() / t.max())
    else:
        w = 1.0 / t
        a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
        (alpha, inv_bw), *_ = np.linalg.lstsq(a, t * w, rcond=None)
        if alpha < 0 or inv_bw <= 0:  # latency negligible at these sizes: bandwidth alone
            alpha, inv_bw = 0.0, float(np.sum(w * w * x * t) / np.sum(w * w * x * x))
        alpha, bw = float(alpha), float(1.0 / inv_bw)
    fit = Fit(alpha * 1e6, min(bw, measured_bw) / 1e9, len(x), fit_busbw_gbs=bw / 1e9 if bw > measured_bw else None,
              max_bus_bytes=float(x.max()))
    err = fit._bus_time(x) / t - 1
    return replace(fit, max_rel_err=float(np.max(np.abs(err))), rms_rel_err=float(np.sqrt(np.mean(err * err))))


@dataclass(frozen=True)
class NetworkProfile:
    """Collective timings and their fits. ``inter_node`` applies beyond ``gpus_per_node`` ranks
    when nothing that large was measured (default: 400 Gb/s InfiniBand per GPU, ~45 GB/s bus)."""

    rows: tuple[Measurement, ...]
    source: str = "unknown"
    backend: str = "nccl"
    gpus_per_node: int = 8
    inter_alpha_us: float = 20.0
    inter_busbw_gbs: float = 45.0
    fits: dict = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be a positive int, got {self.gpus_per_node!r}")
        for name, value, low in (("inter_node.alpha_us", self.inter_alpha_us, 0.0),
                                 ("inter_node.busbw_gbs", self.inter_busbw_gbs, None)):
            if not (math.isfinite(value) and (value > 0 if low is None else value >= low)):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'} (GB/s of "
                                 f"bus bandwidth, microseconds of latency), got {value!r}")
        groups: dict[tuple[str, int], list[Measurement]] = {}
        for m in self.rows:
            groups.setdefault((m.op, m.world_size), []).append(m)
        fits = {key: fit_alpha_beta(key[0], key[1], [m.size_bytes for m in ms], [m.time_us for m in ms])
                for key, ms in groups.items() if key[1] > 1}
        object.__setattr__(self, "fits", fits)

    def fit(self, op: str, n: int) -> Fit:
        """The fit for ``op`` on ``n`` ranks, extrapolated from the nearest measured world size."""
        op = canonical_op(op)
        if (op, n) in self.fits:
            return self.fits[op, n]
        src = op if any(o == op for o, _ in self.fits) else next((o for o in _PROXIES if any(
            o == f for f, _ in self.fits)), None)
        if src is None:
            raise ValueError(f"the network profile ({self.source}) has no collective measurements on more than one "
                             f"rank; measure with `distattn cluster probe` or `distattn cluster nccl-tests`")
        measured = sorted(w for o, w in self.fits if o == src)
        near = min(measured, key=lambda w: abs(np.log(w) - np.log(n)))
        base = self.fits[src, near]
        steps = (lambda w: 1 if op == "send_recv" else max(1, w - 1))
        alpha, busbw = base.alpha_us * steps(n) / steps(near), base.busbw_gbs
        slope = base.fit_busbw_gbs or busbw
        if n > self.gpus_per_node and near <= self.gpus_per_node:
            alpha += self.inter_alpha_us * (1 if op == "send_recv" else np.log2(n / self.gpus_per_node))
            busbw, slope = min(busbw, self.inter_busbw_gbs), min(slope, self.inter_busbw_gbs)
        # the measured range (in bus bytes) and the cap carry over: no extrapolation past what was measured
        return Fit(float(alpha), float(busbw), 0, fit_busbw_gbs=float(slope) if slope > busbw else None,
                   max_bus_bytes=base.max_bus_bytes)

    def describe_fits(self) -> list[str]:
        """What ``distattn cluster fit`` prints: a title, then one line per measured (op, world size)."""
        return [f"alpha-beta fits (t = alpha + factor * size / busbw), {self.source}:"] + \
            [f"  {op:<15} {n:>5} ranks  {f.describe()}" for (op, n), f in sorted(self.fits.items())]

    def time(self, op: str, n: int, size_bytes) -> np.ndarray:
        """Seconds for ``op`` on ``n`` ranks moving ``size_bytes`` (nccl-tests' size; vectorised)."""
        if n <= 1:
            return np.zeros_like(np.asarray(size_bytes, dtype=np.float64))
        return self.fit(op, n).time_s(canonical_op(op), n, size_bytes)

    def sparse_time(self, op: str, n: int, size_bytes, peers) -> np.ndarray:
        """:meth:`time` of a collective over ``n`` ranks in which each rank exchanges with ``peers`` of
        them only (vectorised): the bandwidth of ``n`` ranks, the latency of ``peers + 1`` -- an
        all-to-all with split sizes sends to and receives from the ranks it has rows for, as torch's
        NCCL and gloo ``all_to_all_single`` do."""
        size = np.asarray(size_bytes, dtype=np.float64)
        if n <= 1:
            return np.zeros_like(size)
        peers = np.broadcast_to(np.clip(np.asarray(peers, dtype=np.int64), 1, n - 1), size.shape)
        fit, t = self.fit(op, n), np.zeros_like(size)
        for k in np.unique(peers).tolist():
            at = peers == k
            t[at] = replace(fit, alpha_us=self.fit(op, k + 1).alpha_us).time_s(canonical_op(op), n, size[at])
        return t

    # ---- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"source": self.source, "backend": self.backend, "gpus_per_node": self.gpus_per_node,
                "inter_node": {"alpha_us": self.inter_alpha_us, "busbw_gbs": self.inter_busbw_gbs},
                "rows": [m.row() for m in self.rows],
                "fits": [{"op": op, "world_size": n, "alpha_us": f.alpha_us, "busbw_gbs": f.busbw_gbs,
                          "points": f.points, "fit_busbw_gbs": f.fit_busbw_gbs, "capped": f.capped,
                          "max_bus_bytes": f.max_bus_bytes, "max_rel_err": f.max_rel_err,
                          "rms_rel_err": f.rms_rel_err} for (op, n), f in sorted(self.fits.items())]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))

    @staticmethod
    def from_json(data: dict) -> "NetworkProfile":
        try:
            records = list(data["rows"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a network profile (rows need op, world_size, size_bytes, time_us): {exc}") from None
        rows = []
        for i, r in enumerate(records):
            try:
                rows.append(Measurement(canonical_op(r["op"]), int(r["world_size"]), int(r["size_bytes"]),
                                        float(r["time_us"])))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"not a network profile (rows need op, world_size, size_bytes, time_us): "
                                 f"{exc}") from None
            except ValueError as exc:  # json.loads reads Infinity and NaN: they stop here
                raise ValueError(f"rows[{i}]: {exc}") from None
        rows = tuple(rows)
        inter = data.get("inter_node", {})
        try:
            return NetworkProfile(rows, source=str(data.get("source", "json")), backend=str(data.get("backend", "nccl")),
                                  gpus_per_node=int(data.get("gpus_per_node", 8)),
                                  inter_alpha_us=float(inter.get("alpha_us", 20.0)),
                                  inter_busbw_gbs=float(inter.get("busbw_gbs", 45.0)))
        except (TypeError, AttributeError) as exc:   # a field of the wrong type: a list, a mapping, null
            raise ValueError(f"not a network profile: {exc}") from None

    @staticmethod
    def from_csv(path: str | Path) -> "NetworkProfile":
        """``op, ngpu, size_bytes, t_us_out, ...`` rows, as in ``nccl_perf_h100.csv`` (out-of-place times)."""
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"op", "ngpu", "size_bytes", "t_us_out"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            rows = []
            for r in reader:
                try:
                    rows.append(Measurement(canonical_op(r["op"]), int(r["ngpu"]), int(r["size_bytes"]),
                                            float(r["t_us_out"])))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
        return NetworkProfile(tuple(rows), source=str(path))

    @staticmethod
    def load(path: str | Path) -> "NetworkProfile":
        """A JSON profile (``distattn cluster probe``/``nccl-tests``) or a CSV like ``nccl_perf_h100.csv``."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"network profile {path} does not exist")
        if path.suffix == ".csv":
            return NetworkProfile.from_csv(path)
        try:
            return NetworkProfile.from_json(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc}); pass a profile JSON or an nccl_perf CSV") from None


def default_profile() -> NetworkProfile:
    """No measurements: an H100 node's NVLink (~360 GB/s bus, 10 us) inside 8 GPUs, InfiniBand beyond.
    Figures of the order of ``nccl_perf_h100.csv``'s large-message bus bandwidth."""
    sizes = [2**k for k in range(20, 31, 2)]
    rows = tuple(Measurement(op, 8, s, 10.0 + bus_factor(op, 8) * s / 360e3)
                 for op in OPS for s in sizes)
    return NetworkProfile(rows, source="default (NVLink 360 GB/s + IB 45 GB/s, assumed)")
