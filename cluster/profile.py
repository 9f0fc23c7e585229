"""Network profiles: measured collective times and the alpha-beta model fitted to them.

A profile is a list of measurements ``(op, world_size, size_bytes, time_us)`` with nccl-tests'
size convention: ``size`` is the whole buffer -- the gathered output of ``all_gather``, the input of
``reduce_scatter``, each rank's send buffer of ``all_to_all``, the message of ``send_recv`` (every rank
sends ``size`` to the next and receives from the previous one). Sources: ``distattn cluster probe``
(torch.distributed), ``distattn cluster nccl-tests``, or a CSV like ``nccl_perf_h100.csv``.

Per ``(op, world_size)`` the fit is ``t = alpha + factor(op, n) * size / busbw`` (least squares),
``factor`` being nccl-tests' bus-bandwidth factor: ``(n-1)/n`` for all_gather, reduce_scatter and
all_to_all, ``2(n-1)/n`` for all_reduce, 1 for send_recv. :meth:`NetworkProfile.time` answers for
any size and world size: the fit of that world size, else the nearest measured one, with ``alpha``
scaled by the number of ring steps; an op the profile lacks borrows another's fit (all_gather
first: all_to_all and send_recv move as many bytes per link); a collective spanning more than ``gpus_per_node`` ranks is
capped at the inter-node bus bandwidth when the profile has no measurement that large.

JSON form (what ``probe`` and ``nccl-tests`` write)::

    {"source": str, "backend": str, "gpus_per_node": int,
     "inter_node": {"alpha_us": float, "busbw_gbs": float},
     "rows": [{"op", "world_size", "size_bytes", "time_us", "algbw_gbs", "busbw_gbs"}, ...],
     "fits": [{"op", "world_size", "alpha_us", "busbw_gbs", "points"}, ...]}
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
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

    def row(self) -> dict:
        algbw = self.size_bytes / (self.time_us * 1e3)  # GB/s
        return {"op": self.op, "world_size": self.world_size, "size_bytes": self.size_bytes,
                "time_us": self.time_us, "algbw_gbs": algbw,
                "busbw_gbs": algbw * bus_factor(self.op, self.world_size)}


@dataclass(frozen=True)
class Fit:
    alpha_us: float
    busbw_gbs: float
    points: int

    def time_s(self, op: str, n: int, size_bytes) -> np.ndarray:
        size = np.asarray(size_bytes, dtype=np.float64)
        return (self.alpha_us * 1e-6 + bus_factor(op, n) * size / (self.busbw_gbs * 1e9)) * (size > 0)


def fit_alpha_beta(op: str, n: int, sizes, times_us) -> Fit:
    """Least squares ``t = alpha + factor * size / busbw``; alpha >= 0, weighted by 1/t so small
    and large messages count alike (relative error)."""
    x = np.asarray(sizes, dtype=np.float64) * bus_factor(op, n)
    t = np.asarray(times_us, dtype=np.float64) * 1e-6
    if len(x) == 0:
        raise ValueError(f"no measurements of {op} on {n} ranks to fit")
    if len(x) == 1 or np.ptp(x) == 0:
        return Fit(0.0, float(x.max() / t.max() / 1e9), len(x))
    w = 1.0 / t
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (alpha, inv_bw), *_ = np.linalg.lstsq(a, t * w, rcond=None)
    if alpha < 0 or inv_bw <= 0:  # latency negligible at these sizes: bandwidth alone
        alpha, inv_bw = 0.0, float(np.sum(w * w * x * t) / np.sum(w * w * x * x))
    return Fit(float(alpha) * 1e6, float(1.0 / inv_bw / 1e9), len(x))


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
        if n > self.gpus_per_node and near <= self.gpus_per_node:
            alpha += self.inter_alpha_us * (1 if op == "send_recv" else np.log2(n / self.gpus_per_node))
            busbw = min(busbw, self.inter_busbw_gbs)
        return Fit(float(alpha), float(busbw), 0)

    def time(self, op: str, n: int, size_bytes) -> np.ndarray:
        """Seconds for ``op`` on ``n`` ranks moving ``size_bytes`` (nccl-tests' size; vectorised)."""
        if n <= 1:
            return np.zeros_like(np.asarray(size_bytes, dtype=np.float64))
        return self.fit(op, n).time_s(canonical_op(op), n, size_bytes)

    # ---- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"source": self.source, "backend": self.backend, "gpus_per_node": self.gpus_per_node,
                "inter_node": {"alpha_us": self.inter_alpha_us, "busbw_gbs": self.inter_busbw_gbs},
                "rows": [m.row() for m in self.rows],
                "fits": [{"op": op, "world_size": n, "alpha_us": f.alpha_us, "busbw_gbs": f.busbw_gbs,
                          "points": f.points} for (op, n), f in sorted(self.fits.items())]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @staticmethod
    def from_json(data: dict) -> "NetworkProfile":
        try:
            rows = tuple(Measurement(canonical_op(r["op"]), int(r["world_size"]), int(r["size_bytes"]),
                                     float(r["time_us"])) for r in data["rows"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a network profile (rows need op, world_size, size_bytes, time_us): {exc}") from None
        inter = data.get("inter_node", {})
        return NetworkProfile(rows, source=data.get("source", "json"), backend=data.get("backend", "nccl"),
                              gpus_per_node=int(data.get("gpus_per_node", 8)),
                              inter_alpha_us=float(inter.get("alpha_us", 20.0)),
                              inter_busbw_gbs=float(inter.get("busbw_gbs", 45.0)))

    @staticmethod
    def from_csv(path: str | Path) -> "NetworkProfile":
        """``op, ngpu, size_bytes, t_us_out, ...`` rows, as in ``nccl_perf_h100.csv`` (out-of-place times)."""
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"op", "ngpu", "size_bytes", "t_us_out"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            rows = tuple(Measurement(canonical_op(r["op"]), int(r["ngpu"]), int(r["size_bytes"]),
                                     float(r["t_us_out"])) for r in reader)
        return NetworkProfile(rows, source=str(path))

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
