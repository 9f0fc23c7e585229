"""Network profiles: measured collective times and the alpha-beta model fitted to them.

A profile is a list of measurements ``(op, world_size, size_bytes, time_us, nodes)`` with nccl-tests'
size convention: ``size`` is the whole buffer -- the gathered output of ``all_gather``, the input of
``reduce_scatter``, each rank's send buffer of ``all_to_all``, the message of ``send_recv`` (every rank
sends ``size`` to the next); ``nodes``: the nodes the ranks span (None: ``ceil(world_size / gpus_per_node)``).
Sources: ``distattn cluster probe``/``nccl-tests`` (JSON), CSVs (:mod:`distattn.costmodel.network_csv`), and the
profiles the package ships, by name (:func:`packaged_profiles`: ``h100``).

Per ``(op, world_size, nodes)`` the fit is ``t = alpha + factor(op, n) * size / busbw`` (least
squares over the median time of each size), ``factor`` being nccl-tests' bus-bandwidth factor:
``(n-1)/n`` for all_gather, reduce_scatter and all_to_all, ``2(n-1)/n`` for all_reduce, 1 for
send_recv. A line fitted to latency-bound sizes can have a slope far steeper than any measured
bandwidth, so the fit never predicts more than was measured: its ``busbw`` is capped at the largest
measured bus bandwidth (``capped`` says so, ``fit_busbw_gbs`` keeps the line's slope), no size is
predicted faster than that, and sizes beyond the largest measured one add time at ``busbw``.
``max_rel_err``/``rms_rel_err`` are the prediction's relative error over the measured points.

:meth:`NetworkProfile.time` answers for any size, world size and node span; each :class:`Fit` says in
``basis`` what it came from. A measured configuration uses its own fit. Otherwise:

* a *strict* profile (published data) prices the bytes that cross. Per GPU a collective moves a share
  of its bus bytes over NVLink inside its node and a share through its NIC (:func:`shares`); each share
  moves at the rate measured for its scope and the slower of the two sets the time (they overlap: NCCL
  runs both at once). The intra-node rate is the nearest intra-node fit's bus bandwidth (closest world
  size to the GPUs a node holds); the NIC rate is what the op's inter-node fits imply (their bus
  bandwidth times their own inter share), at the closest GPUs-per-node density for each measured node
  count, interpolated in log space between the two node counts around the query (the nearest outside
  them): no rate above what the tables show for its scope. ``alpha`` is the nearest configuration's of
  the same op and scope -- the closest density ``n / nodes``, then the closest world size (both in log
  space), then the larger -- scaled by the ratio of ring steps (``n - 1``; 1 for send_recv); the measured
  range comes from it too. An op or scope without rows raises ``ValueError``. A configuration whose sizes
  cannot show a latency takes its alpha alike (:func:`_latency_from_neighbours`).
  :meth:`NetworkProfile.check` scores the rule against every measured configuration, left out in turn.
* a legacy profile (probe/nccl-tests JSON, ``nccl_perf`` CSV, :func:`default_profile`) takes the nearest
  measured world size of the op (log space, ties to the smaller), alpha scaled alike; an op it lacks
  borrows another's fit (all_gather first: all_to_all and send_recv move as many bytes per link); an
  inter-node query answered from an intra-node fit is capped at the assumed ``inter_busbw_gbs``, with
  ``inter_alpha_us`` added per doubling beyond a node.

:meth:`NetworkProfile.assumptions` lists the fits asked so far that were not measured as asked.

JSON form (what ``probe`` and ``nccl-tests`` write; ``strict``, a row's ``nodes``, ``source`` and
``origin`` optional)::

    {"source": str, "backend": str, "gpus_per_node": int, "strict": bool,
     "inter_node": {"alpha_us": float, "busbw_gbs": float},
     "rows": [{"op", "world_size", "size_bytes", "time_us", "algbw_gbs", "busbw_gbs", "nodes", "source",
               "origin"}, ...],
     "fits": [{"op", "world_size", "nodes", "alpha_us", "busbw_gbs", "points", "fit_busbw_gbs", "capped",
               "max_bus_bytes", "max_rel_err", "rms_rel_err", "basis"}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .jsonfile import read_json
from .network_csv import (OPS, Measurement, bus_factor, canonical_op, config_name, load_csv, load_published,
                          network_argument, network_help, network_source, packaged_file, packaged_profiles, parse_size,
                          unknown_network)

_PROXIES = ("all_gather", "reduce_scatter", "all_to_all", "send_recv", "all_reduce")
_LATENCY_BLIND_BYTES = 2**30   # measured only at or above this: no latency of its own (_latency_from_neighbours)
_BINARIES = {"all_gather": "all_gather_perf", "reduce_scatter": "reduce_scatter_perf", "all_to_all": "alltoall_perf",
             "send_recv": "sendrecv_perf", "all_reduce": "all_reduce_perf"}


@dataclass(frozen=True)
class Fit:
    """``t = alpha + x / fit_busbw`` for bus bytes ``x = factor * size`` up to ``max_bus_bytes``, never
    faster than ``busbw``; beyond ``max_bus_bytes`` the extra bytes move at ``busbw``. A fit made by
    hand (``Fit(alpha, busbw, points)``) is the plain line. ``basis`` says what it came from."""

    alpha_us: float
    busbw_gbs: float                      # the bandwidth predictions use: <= the largest measured
    points: int
    fit_busbw_gbs: float | None = None    # least-squares slope, when above busbw_gbs
    max_bus_bytes: float = math.inf       # the largest measured factor * size
    max_rel_err: float | None = None      # |predicted / measured - 1| over the measured points
    rms_rel_err: float | None = None
    basis: str = "given"                  # "measured ...", "nearest: ...", "borrowed from ...", "assumed ..."
    intra_gbs: float | None = None        # priced by shares (strict, inter-node): the NVLink rate used
    nic_gbs: float | None = None          # ... and the NIC rate

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
            notes.append(f"capped at the best measured; the line's slope is {self.fit_busbw_gbs:.3f} GB/s")
        return f"alpha {self.alpha_us:9.1f} us  busbw {self.busbw_gbs:9.3f} GB/s  ({', '.join(notes)})"


def fit_alpha_beta(op: str, n: int, sizes, times_us, alpha_us: float | None = None) -> Fit:
    """Least squares ``t = alpha + factor * size / busbw``; alpha >= 0, weighted by 1/t so small
    and large messages count alike (relative error); ``alpha_us`` given: alpha fixed, the bandwidth
    fitted alone. The bandwidth is then capped at the largest measured one (see :class:`Fit`) and
    the fit's error over the points reported."""
    x = np.asarray(sizes, dtype=np.float64) * bus_factor(op, n)
    t = np.asarray(times_us, dtype=np.float64) * 1e-6
    if len(x) == 0:
        raise ValueError(f"no measurements of {op} on {n} ranks to fit")
    measured_bw = float(np.max(x / t))
    if measured_bw <= 0:  # only empty messages: nothing says how fast bytes move
        raise ValueError(f"the measurements of {op} on {n} ranks are all of size 0; measure non-empty messages")
    if alpha_us is not None:
        w, alpha = 1.0 / t, alpha_us * 1e-6
        inv_bw = float(np.sum(w * w * x * (t - alpha)) / np.sum(w * w * x * x))
        if inv_bw <= 0:
            raise ValueError(f"alpha_us {alpha_us} is not below the measured times of {op} on {n} ranks; pass less")
        bw = 1.0 / inv_bw
    elif len(x) == 1 or np.ptp(x) == 0:
        alpha, bw = 0.0, float(x.max() / t.max())
    else:
        w = 1.0 / t
        a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
        (alpha, inv_bw), *_ = np.linalg.lstsq(a, t * w, rcond=None)
        if alpha < 0 or inv_bw <= 0:  # latency negligible at these sizes: bandwidth alone
            alpha, inv_bw = 0.0, float(np.sum(w * w * x * t) / np.sum(w * w * x * x))
        alpha, bw = float(alpha), float(1.0 / inv_bw)
    fit = Fit(alpha * 1e6, min(bw, measured_bw) / 1e9, len(x), fit_busbw_gbs=bw / 1e9 if bw > measured_bw else None,
              max_bus_bytes=float(x.max()), basis=f"measured {op} {n} GPUs")
    err = fit._bus_time(x) / t - 1
    return replace(fit, max_rel_err=float(np.max(np.abs(err))), rms_rel_err=float(np.sqrt(np.mean(err * err))))


def _ring_steps(op: str, n: int) -> int:
    """What alpha scales with between world sizes: a ring's n - 1 steps; a send_recv is one."""
    return 1 if op == "send_recv" else max(1, n - 1)


def _steps_note(op: str, n: int, near: int) -> str:
    steps = (_ring_steps(op, n), _ring_steps(op, near))
    return f" x {steps[0]}/{steps[1]}" if steps[0] != steps[1] else ""


def _nearest(keys, n: int, span: int) -> tuple[str, int, int]:
    """The strict rule's nearest configuration to ``n`` ranks over ``span`` nodes: the closest GPUs-per-node
    density (log space; it sets how many GPUs share a node's links), then the closest world size (log
    space), then the larger one."""
    density = n / span
    return min(keys, key=lambda k: (abs(math.log(density * k[2] / k[1])), abs(math.log(n / k[1])), -k[1], k[2]))


def shares(op: str, n: int, nodes: int) -> tuple[float, float]:
    """Per GPU, the fractions of a collective's bus bytes (``bus_factor(op, n) * size``) that move over
    NVLink inside its node and through its own NIC, ``n`` ranks over ``nodes`` nodes (``g = n / nodes``
    a node; one GPU a node has no NVLink share):

    * all_to_all: ``(g - 1) / (n - 1)`` to its node's peers, ``(n - g) / (n - 1)`` to the others;
    * all_gather, reduce_scatter, all_reduce (NCCL's rings, one per NIC): every byte once over NVLink,
      and a node's rings leave it through its ``g`` NICs, ``1 / g`` of the bytes each;
    * send_recv: the rank at a node's edge sends the whole message across, the others over NVLink.

    One node: ``(1, 0)``."""
    if nodes <= 1:
        return 1.0, 0.0
    g = n / nodes
    if op == "all_to_all":
        return (g - 1) / (n - 1), (n - g) / (n - 1)
    inside = 1.0 if g > 1 else 0.0
    return inside, (1.0 if op == "send_recv" else 1.0 / g)


def _nic_rate(fit: "Fit", key: tuple) -> tuple[float, float]:
    """What a measured inter-node fit implies for one NIC: ``(rate, slope)``, GB/s through a NIC."""
    inter = shares(*key)[1]
    return fit.busbw_gbs * inter, (fit.fit_busbw_gbs or fit.busbw_gbs) * inter


def _latency_from_neighbours(fits: dict, groups: dict) -> dict:
    """A configuration whose sizes cannot show a latency -- one size, or none below
    ``_LATENCY_BLIND_BYTES`` (a latency of 100s of us is noise in a 100-ms run) -- takes the alpha of
    the nearest configuration of its op and scope that can (scaled by ring steps) and fits its bandwidth
    to its rows with that alpha, so a smaller message pays a latency instead of moving at the large
    messages' bandwidth from zero; the measured points themselves stay within the fit's error."""
    def blind(key) -> bool:
        return fits[key].points == 1 or min(m.size_bytes for m in groups[key]) >= _LATENCY_BLIND_BYTES

    out = dict(fits)
    for key in filter(blind, fits):
        op, n, span = key
        able = [k for k in fits if k[0] == op and (k[2] > 1) == (span > 1) and not blind(k)]
        if not able:
            continue
        near = _nearest(able, n, span)
        alpha = fits[near].alpha_us * _ring_steps(op, n) / _ring_steps(op, near[1])
        if alpha < min(m.time_us for m in groups[key]):
            refit = _fit_group(key, groups[key], alpha)
            note = f", alpha of {config_name(*near)}{_steps_note(op, n, near[1])}"
            out[key] = replace(refit, basis=refit.basis + note)
    return out


@dataclass(frozen=True)
class NetworkProfile:
    """Collective timings and their fits, keyed ``(op, world_size, nodes)``; ``strict``: answered only from
    fits of the query's own op and scope, else ``inter_node`` (default: 400 Gb/s InfiniBand per GPU, ~45
    GB/s bus) applies as the module says. A copy made by ``dataclasses.replace`` starts its own record
    of :meth:`assumptions`."""

    rows: tuple[Measurement, ...]
    source: str = "unknown"
    backend: str = "nccl"
    gpus_per_node: int = 8
    inter_alpha_us: float = 20.0
    inter_busbw_gbs: float = 45.0
    fits: dict = field(default=None, repr=False, compare=False)
    strict: bool = False
    _groups: dict = field(default=None, init=False, repr=False, compare=False)   # key -> its rows
    _derived: dict = field(default=None, init=False, repr=False, compare=False)  # key -> (Fit, base key)
    _asked: set = field(default=None, init=False, repr=False, compare=False)     # every key fit() answered

    def __post_init__(self):
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be a positive int, got {self.gpus_per_node!r}")
        for name, value, low in (("inter_node.alpha_us", self.inter_alpha_us, 0.0),
                                 ("inter_node.busbw_gbs", self.inter_busbw_gbs, None)):
            if not (math.isfinite(value) and (value > 0 if low is None else value >= low)):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'} (GB/s of "
                                 f"bus bandwidth, microseconds of latency), got {value!r}")
        groups: dict[tuple[str, int, int], list[Measurement]] = {}
        for m in self.rows:
            groups.setdefault((m.op, m.world_size, m.nodes or -(-m.world_size // self.gpus_per_node)), []).append(m)
        object.__setattr__(self, "_groups", {key: tuple(ms) for key, ms in groups.items()})
        fits = {key: _fit_group(key, ms) for key, ms in groups.items() if key[1] > 1}
        object.__setattr__(self, "fits", _latency_from_neighbours(fits, groups) if self.strict else fits)
        object.__setattr__(self, "_derived", {})
        object.__setattr__(self, "_asked", set())

    def _span(self, n: int, nodes: int | None) -> int:
        if nodes is None:
            return max(1, -(-n // self.gpus_per_node))
        if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or not 1 <= nodes <= max(1, n):
            raise ValueError(f"nodes must be an int from 1 to the {n} ranks (the nodes they span), got {nodes!r}; "
                             "pass None for ceil(ranks / gpus_per_node)")
        return int(nodes)

    def fit(self, op: str, n: int, nodes: int | None = None) -> Fit:
        """The fit for ``op`` on ``n`` ranks spanning ``nodes`` nodes (default ``ceil(n / gpus_per_node)``):
        the measured one, else one derived from the nearest measured configuration (module docstring)."""
        op = canonical_op(op)
        key = (op, n, self._span(n, nodes))
        self._asked.add(key)
        if key in self.fits:
            return self.fits[key]
        if key not in self._derived:
            self._derived[key] = self._nearest_strict(*key) if self.strict else self._nearest_legacy(*key)
        return self._derived[key][0]

    def _nearest_strict(self, op: str, n: int, span: int) -> tuple[Fit, tuple]:
        inter = span > 1
        same = [k for k in self.fits if k[0] == op and (k[2] > 1) == inter]
        if not same:
            where = f"across nodes ({_BINARIES[op]} on GPUs of 2 or more nodes)" if inter else \
                f"within one node ({_BINARIES[op]} on the GPUs of a node)"
            raise ValueError(f"the network profile ({self.source}) has no {'inter' if inter else 'intra'}-node {op} "
                             f"measurements for {config_name(op, n, span)}; measure {op} {where} and add its CSV")
        base = _nearest(same, n, span)
        if not inter:
            return self._scaled(op, n, base, assume_inter=False), base
        return self._by_shares(op, n, span, base, same), base

    def _by_shares(self, op: str, n: int, span: int, base: tuple, inter_keys: list) -> "Fit":
        """An unmeasured inter-node configuration priced by its shares (module docstring): ``base``'s alpha
        (ring steps) and measured range, the slower of the NVLink share at the intra-node rate and the NIC
        share at the NIC rate (with their slopes alike)."""
        intra_share, inter_share = shares(op, n, span)
        (nic, nic_slope), nic_from = self._nic_rate(op, n, span, inter_keys)
        busbw, slope, intra = nic / inter_share, nic_slope / inter_share, None
        how = [f"NIC rate from {nic_from}"]
        intra_keys = [k for k in self.fits if k[0] == op and k[2] == 1]
        if intra_share > 0 and intra_keys:
            near = min(intra_keys, key=lambda k: (abs(math.log(n / span / k[1])), -k[1]))
            f = self.fits[near]
            intra = f.busbw_gbs
            busbw = min(busbw, intra / intra_share)
            slope = min(slope, (f.fit_busbw_gbs or f.busbw_gbs) / intra_share)
            how.append(f"NVLink rate from {config_name(*near)}")
        elif intra_share > 0:
            how.append(f"NVLink share unpriced (no intra-node {op} rows)")
        alpha = self.fits[base].alpha_us * _ring_steps(op, n) / _ring_steps(op, base[1])
        how.append(f"alpha of {config_name(*base)}{_steps_note(op, n, base[1])}")
        return Fit(float(alpha), float(busbw), 0, fit_busbw_gbs=float(slope) if slope > busbw else None,
                   max_bus_bytes=self.fits[base].max_bus_bytes, basis="shares: " + ", ".join(how),
                   intra_gbs=None if intra is None else float(intra), nic_gbs=float(nic))

    def _nic_rate(self, op: str, n: int, span: int, keys: list) -> tuple[tuple[float, float], str]:
        """The NIC rate (and slope) for ``op`` on ``n`` ranks over ``span`` nodes from the measured
        inter-node ``keys``: per measured node count the configuration of the closest density, then
        log-log between the node counts around ``span`` (the nearest outside them); and what it came from."""
        density = n / span
        by_nodes = {}
        for k in keys:
            best = by_nodes.get(k[2])
            if best is None or (abs(math.log(density * k[2] / k[1])), -k[1]) < \
                    (abs(math.log(density * best[2] / best[1])), -best[1]):
                by_nodes[k[2]] = k
        counts = sorted(by_nodes)
        lo = max([c for c in counts if c <= span], default=counts[0])
        hi = min([c for c in counts if c >= span], default=counts[-1])
        a, b = _nic_rate(self.fits[by_nodes[lo]], by_nodes[lo]), _nic_rate(self.fits[by_nodes[hi]], by_nodes[hi])
        if lo == hi:
            return a, config_name(*by_nodes[lo])
        t = math.log(span / lo) / math.log(hi / lo)
        rate = tuple(float(x ** (1 - t) * y ** t) for x, y in zip(a, b))
        return rate, f"{config_name(*by_nodes[lo])} and {config_name(*by_nodes[hi])}, log-interpolated"

    def _nearest_legacy(self, op: str, n: int, span: int) -> tuple[Fit, tuple]:
        src = next((o for o in (op, *_PROXIES) if any(k[0] == o for k in self.fits)), None)
        if src is None:
            raise ValueError(f"the network profile ({self.source}) has no collective measurements on more than one "
                             f"rank; measure with `distattn cluster probe` or `distattn cluster nccl-tests`")
        # as before nodes were known: the nearest world size (log space), ties to the smaller
        base = min((k for k in self.fits if k[0] == src),
                   key=lambda k: (abs(math.log(n / k[1])), k[1], (k[2] > 1) != (span > 1), k[2]))
        return self._scaled(op, n, base, assume_inter=span > 1 and base[2] == 1), base

    def _scaled(self, op: str, n: int, base_key: tuple, assume_inter: bool) -> Fit:
        """``base_key``'s fit moved to ``n`` ranks: alpha times the ratio of ring steps, plus (legacy) the
        inter-node assumption; the measured range (in bus bytes) and the cap carry over: no
        extrapolation past what was measured."""
        src, near, _ = base_key
        base = self.fits[base_key]
        alpha = base.alpha_us * _ring_steps(op, n) / _ring_steps(op, near)
        busbw, slope = base.busbw_gbs, base.fit_busbw_gbs or base.busbw_gbs
        how = [("nearest: " if src == op else f"borrowed from (no {op} measured): ") + config_name(*base_key)]
        if _ring_steps(op, n) != _ring_steps(op, near):
            how.append(f"alpha{_steps_note(op, n, near)}")
        if assume_inter:
            extra = self.inter_alpha_us * (1 if op == "send_recv" else max(0.0, math.log2(n / self.gpus_per_node)))
            alpha += extra
            busbw, slope = min(busbw, self.inter_busbw_gbs), min(slope, self.inter_busbw_gbs)
            how.append(f"assumed inter-node {self.inter_busbw_gbs:g} GB/s, alpha + {extra:.1f} us")
        return Fit(float(alpha), float(busbw), 0, fit_busbw_gbs=float(slope) if slope > busbw else None,
                   max_bus_bytes=base.max_bus_bytes, basis=", ".join(how))

    def check(self) -> list[dict]:
        """How well the strict rule prices what was measured: per op and scope (``intra``, or the node
        count), over every measured size, the relative error of the predicted time (= of the bus
        bandwidth) of each measured configuration -- ``fit``: its own fit, as :meth:`time` uses it;
        ``left_out``: the rule's price with that configuration's rows left out (inter-node only: an
        intra-node configuration left out leaves no other of its scope). Rows ``{op, scope, configs,
        points, fit_median, fit_worst, left_out_median, left_out_worst}`` (None where nothing was left
        out)."""
        if not self.strict:
            raise ValueError("check scores a strict (published) profile's rule; this profile is not strict")
        errors: dict[tuple[str, str], tuple[list, list, set]] = {}
        for key, rows in sorted(self._groups.items()):
            op, n, span = key
            if n <= 1:
                continue
            sizes = sorted({m.size_bytes for m in rows})
            measured = np.array([np.median([m.time_us for m in rows if m.size_bytes == s]) for s in sizes]) * 1e-6
            fit_err, out_err, configs = errors.setdefault((op, "intra" if span == 1 else f"{span} nodes"),
                                                          ([], [], set()))
            configs.add(key)
            fit_err += list(np.abs(self.time(op, n, sizes, span) / measured - 1))
            others = tuple(m for m in self.rows if (m.op, m.world_size, m.nodes or
                                                    -(-m.world_size // self.gpus_per_node)) != key)
            rest = replace(self, rows=others)
            if span > 1 and any(k[0] == op and k[2] > 1 for k in rest.fits):
                out_err += list(np.abs(rest.time(op, n, sizes, span) / measured - 1))

        def stat(values, f):
            return float(f(values)) if values else None
        return [{"op": op, "scope": scope, "configs": len(configs), "points": len(fit_err),
                 "fit_median": stat(fit_err, np.median), "fit_worst": stat(fit_err, np.max),
                 "left_out_median": stat(out_err, np.median), "left_out_worst": stat(out_err, np.max)}
                for (op, scope), (fit_err, out_err, configs) in sorted(errors.items(), key=lambda kv: (
                    kv[0][0], 0 if kv[0][1] == "intra" else int(kv[0][1].split()[0])))]

    def assumptions(self) -> list[str]:
        """One line per fit asked so far (:meth:`fit`, :meth:`time`, ...) that was not measured as asked:
        its configuration and basis (nearest, borrowed, assumed inter-node)."""
        return [f"{config_name(*key)}: {fit.basis}" for key, (fit, _) in sorted(self._derived.items())]

    def asked(self) -> list[tuple[str, int, int]]:
        """Every ``(op, ranks, nodes)`` :meth:`fit` has answered so far (what ``--verbose`` describes)."""
        return sorted(self._asked)

    def describe_fit(self, op: str, n: int, nodes: int | None = None) -> list[str]:
        """The fit :meth:`time` uses for ``op`` on ``n`` ranks over ``nodes``, then the rows it was fitted on:
        op, ranks, nodes, size, time and the file (and line) each came from; sizes measured more than
        once end with the median the fit used."""
        fit, op = self.fit(op, n, nodes), canonical_op(op)
        key = (op, n, self._span(n, nodes))
        base = key if key in self.fits else self._derived[key][1]
        lines = [f"{config_name(*key)}: {fit.describe()}", f"  basis: {fit.basis}", f"  {self.shares_line(op, *key[1:])}"]
        rows = sorted(self._groups[base], key=lambda m: (m.size_bytes, m.origin or ""))
        for i, m in enumerate(rows):
            lines.append(f"  {m.op:<15} {m.world_size:>5} GPUs {base[2]:>3} nodes {m.size_bytes:>14,} B "
                         f"{m.time_us:>12.2f} us  {m.origin or self.source}")
            same = [r.time_us for r in rows if r.size_bytes == m.size_bytes]
            if len(same) > 1 and (i + 1 == len(rows) or rows[i + 1].size_bytes != m.size_bytes):
                lines.append(f"    -> {m.size_bytes:,} B: median {float(np.median(same)):.2f} us of {len(same)} rows")
        return lines

    def shares_line(self, op: str, n: int, nodes: int | None = None) -> str:
        """``shares: intra X at R GB/s, inter Y at R GB/s a NIC``: the bytes :func:`shares` gives each scope
        and the rate each moves at -- as priced (a strict profile's unmeasured inter-node fit), else as
        the fit's own bus bandwidth implies (the whole time spent on either share)."""
        fit, op, span = self.fit(op, n, nodes), canonical_op(op), self._span(n, nodes)
        intra_share, inter_share = shares(op, n, span)
        if fit.nic_gbs is not None:
            intra, nic = fit.intra_gbs, fit.nic_gbs
        else:
            intra, nic = (fit.busbw_gbs if span == 1 else None), fit.busbw_gbs * inter_share
        parts = [f"intra {intra_share:.3f}" + ("" if intra_share == 0 else
                                              f" at {intra:.1f} GB/s" if intra is not None else " (in the measured time)")]
        if span > 1:
            parts.append(f"inter {inter_share:.3f} at {nic:.1f} GB/s a NIC" +
                         ("" if fit.nic_gbs is not None else " (implied by the measured time)"))
        return "shares: " + ", ".join(parts)

    def describe_fits(self) -> list[str]:
        """What ``distattn cluster fit`` prints: a title, then one line per measured (op, ranks, nodes)."""
        title = f"alpha-beta fits (t = alpha + factor * size / busbw), {self.source}" + \
            (" (strict: no borrowed fits, no assumed inter-node bandwidth):" if self.strict else ":")
        return [title] + [f"  {op:<15} {n:>5} ranks {nodes:>3} node{'s' if nodes > 1 else ' '}  {f.describe()}"
                          for (op, n, nodes), f in sorted(self.fits.items())]

    def time(self, op: str, n: int, size_bytes, nodes: int | None = None) -> np.ndarray:
        """Seconds for ``op`` on ``n`` ranks over ``nodes`` moving ``size_bytes`` (nccl-tests' size; vectorised)."""
        if n <= 1:
            return np.zeros_like(np.asarray(size_bytes, dtype=np.float64))
        return self.fit(op, n, nodes).time_s(canonical_op(op), n, size_bytes)

    def sparse_time(self, op: str, n: int, size_bytes, peers, nodes: int | None = None) -> np.ndarray:
        """:meth:`time` of a collective over ``n`` ranks in which each rank exchanges with ``peers`` of
        them only (vectorised): the bandwidth of ``n`` ranks, the latency of ``peers + 1`` -- an
        all-to-all with split sizes sends to and receives from the ranks it has rows for, as torch's
        NCCL and gloo ``all_to_all_single`` do. Those ``peers + 1`` ranks are taken to span as many of
        the collective's nodes as they can (``min(nodes, peers + 1)``): an inter-node exchange keeps an
        inter-node latency however few its peers (a legacy profile asked without ``nodes``: their
        default span, as before nodes were known)."""
        size = np.asarray(size_bytes, dtype=np.float64)
        if n <= 1:
            return np.zeros_like(size)
        span = self._span(n, nodes)
        peers = np.broadcast_to(np.clip(np.asarray(peers, dtype=np.int64), 1, n - 1), size.shape)
        fit, t = self.fit(op, n, span), np.zeros_like(size)
        for k in np.unique(peers).tolist():
            at = peers == k
            alpha = self.fit(op, k + 1, min(span, k + 1) if self.strict or nodes is not None else None).alpha_us
            t[at] = replace(fit, alpha_us=alpha).time_s(canonical_op(op), n, size[at])
        return t

    # ---- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"source": self.source, "backend": self.backend, "gpus_per_node": self.gpus_per_node,
                **({"strict": True} if self.strict else {}),
                "inter_node": {"alpha_us": self.inter_alpha_us, "busbw_gbs": self.inter_busbw_gbs},
                "rows": [m.row() for m in self.rows],
                "fits": [{"op": op, "world_size": n, "nodes": nodes, "alpha_us": f.alpha_us, "busbw_gbs": f.busbw_gbs,
                          "points": f.points, "fit_busbw_gbs": f.fit_busbw_gbs, "capped": f.capped,
                          "max_bus_bytes": f.max_bus_bytes, "max_rel_err": f.max_rel_err,
                          "rms_rel_err": f.rms_rel_err, "basis": f.basis}
                         for (op, n, nodes), f in sorted(self.fits.items())]}

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
                                        float(r["time_us"]), nodes=None if r.get("nodes") is None else int(r["nodes"]),
                                        source=r.get("source"), origin=r.get("origin")))
            except (KeyError, TypeError, AttributeError) as exc:
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
                                  inter_busbw_gbs=float(inter.get("busbw_gbs", 45.0)),
                                  strict=data.get("strict", False) is True)
        except (TypeError, AttributeError) as exc:   # a field of the wrong type: a list, a mapping, null
            raise ValueError(f"not a network profile: {exc}") from None

    @staticmethod
    def from_csv(path: str | Path) -> "NetworkProfile":
        """One CSV, published or ``nccl_perf`` format, told by its columns
        (:func:`distattn.costmodel.network_csv.load_csv`)."""
        rows, options = load_csv(path)
        return NetworkProfile(rows, **options)

    @staticmethod
    def load(path: str | Path) -> "NetworkProfile":
        """A folder of published-format CSVs, one CSV (published or ``nccl_perf``, told by its columns), or a
        JSON profile (``distattn cluster probe``/``nccl-tests``)."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"network profile {path} does not exist")
        if path.is_dir() or path.suffix == ".csv":
            rows, options = load_published(path) if path.is_dir() else load_csv(path)
            return NetworkProfile(rows, **options)
        data = read_json(path, "a network profile (distattn cluster probe/nccl-tests writes one), or pass a CSV or "
                               "a folder of CSVs")
        try:
            return NetworkProfile.from_json(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _fit_group(key: tuple[str, int, int], rows, alpha_us: float | None = None) -> Fit:
    """The fit of one measured configuration: repeated runs of a size count once, by their median."""
    times: dict[int, list[float]] = {}
    for m in rows:
        times.setdefault(m.size_bytes, []).append(m.time_us)
    sizes = sorted(times)
    fit = fit_alpha_beta(key[0], key[1], sizes, [float(np.median(times[s])) for s in sizes], alpha_us)
    counts = f"{len(sizes)} size{'s' if len(sizes) > 1 else ''}"
    counts += f", {len(rows)} rows" if len(rows) > len(sizes) else ""   # repeated runs
    return replace(fit, basis=f"measured {config_name(*key)} ({counts})")


def default_profile() -> NetworkProfile:
    """No measurements: an H100 node's NVLink (~360 GB/s bus, 10 us) inside 8 GPUs, InfiniBand beyond.
    Figures of the order of ``nccl_perf_h100.csv``'s large-message bus bandwidth."""
    sizes = [2**k for k in range(20, 31, 2)]
    rows = tuple(Measurement(op, 8, s, 10.0 + bus_factor(op, 8) * s / 360e3)
                 for op in OPS for s in sizes)
    return NetworkProfile(rows, source="default (NVLink 360 GB/s + IB 45 GB/s, assumed)")


# ---- packaged profiles: their names and --network's parsing live in distattn.costmodel.network_csv (light) ----

def packaged_profile(name: str) -> NetworkProfile:
    """The packaged profile ``name`` (:func:`packaged_profiles`), read through importlib.resources (so from
    an installed wheel too); ``ValueError`` names the packaged profiles."""
    if name not in packaged_profiles():
        raise unknown_network(name)
    return NetworkProfile.from_json(json.loads(packaged_file(name).read_text()))


def profile_of(source) -> NetworkProfile:
    """A :class:`NetworkProfile` from what a caller names: one already made, a path
    (:meth:`NetworkProfile.load`), a packaged profile's name (:func:`packaged_profile`; an existing path
    of the same name wins), or None (:func:`default_profile`)."""
    if source is None:
        return default_profile()
    if isinstance(source, NetworkProfile):
        return source
    found = network_source(str(source))   # an existing path, a packaged profile's file, or (zipped) its name
    return NetworkProfile.load(found) if Path(found).exists() else packaged_profile(found)


# the measurements' names live in distattn.costmodel.network_csv; callers have always found them here
__all__ = ["OPS", "Measurement", "Fit", "NetworkProfile", "shares", "bus_factor", "canonical_op", "config_name", "parse_size",
           "fit_alpha_beta", "default_profile", "profile_of", "packaged_profiles", "packaged_profile",
           "network_source", "network_argument", "network_help"]
