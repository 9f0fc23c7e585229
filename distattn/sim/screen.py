"""A closed-form screen of a per-batch step's layouts: each class's time from four numbers of each of its
groups, not a replay.

:func:`~.per_batch.choose_step` weighs a dozen layouts, each with several schedulers per group size; replaying
every one of them (:func:`~.per_batch.class_time`) costs a second a step at 64 ranks and ten at 512. But a
group's step, for one scheduler at one size, checkpointing and nano-batch count, is close to linear in

* ``tokens``: its tokens a rank (the linear layers, and the bytes every scheduler moves);
* ``even``: its forward attention seconds a rank were they evened out over its ranks, each document at the
  kernel's speed for its length (what ``ulysses`` and ``cad`` reach);
* ``layout``: the forward attention seconds of its busiest rank on the scheduler's token layout (what the
  ring family and the all-gather reach: a contiguous shard of a long document carries more of its pairs);

so :class:`Screen` fits ``step = a + b tokens + c even + d layout`` per such setting by least squares on
:data:`FIT_GROUPS` groups replayed alone (documents drawn from the step's own, filling a random share of
the group's room, a long document in some), once per job (the fits are kept, :func:`screen_of`), and prices
a class as its slowest group: groups of a class do not wait for each other but at FSDP's collectives, and
every layer runs the same pieces, so the slowest group is the slowest at each. The replay then times the
groups the screen prices slowest (:meth:`Screen.slowest`). ``tests/test_screen.py`` holds the screen to the
replay. Measured against it on groups no fit saw (balanced packing's, 64 H100s at 128K on WLB-LLM's lengths,
four draws): ``ulysses`` 8 within 1.7%, ``zigzag`` 8 3.4%, ``cad`` 8 1.8%, ``usp`` 16 2%, ``usp`` 32 11% (its
ring crosses nodes: the transfers hidden behind attention are not linear in these numbers). The fits take
3-5 s at 64 ranks and 10-17 s at 512, once per job; a step's choosing then takes 0.13-0.3 s and 1.0-1.2 s.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, replace

import numpy as np

from ..planning.layout import Layout
from ..planning.schedule import layout_segments
from ..schedulers import spec
from .job import SimConfig, attention_kernel, attn_shape, plan_context

FIT_GROUPS = 16        # groups replayed alone to fit one setting's coefficients
LONG_EVERY = 2         # every second fit group is led by one long document (as a step's longest are)
FEATURES = ("1", "tokens", "even", "layout")
MEMO_KEPT = 200_000   # groups' features kept


@dataclass(frozen=True)
class Fit:
    """One setting's coefficients (over :data:`FEATURES`), the largest relative error of the fit on its
    own groups, and the seconds fitting it took."""

    coef: tuple[float, ...]
    error: float
    seconds: float


class Screen:
    """A job's fits (module docstring), made as the settings are first asked for and kept: ``price``
    answers a class's seconds, ``fits`` what has been fitted (``fit_seconds``: how long that took).

    ``replay(cfg, name, cp, groups)`` is the replay a class is fitted to (:func:`~.per_batch.class_time`
    with ``whole=False``); ``rank_cap`` the tokens a rank may hold, which bounds the fit's groups."""

    def __init__(self, cfg: SimConfig, replay, rank_cap: int):
        self.cfg, self.replay, self.rank_cap = cfg, replay, rank_cap
        self.heads = attn_shape(cfg).num_heads
        self.kernel = attention_kernel(cfg)
        self.fits: dict[tuple, Fit] = {}
        self.fit_seconds = 0.0   # every fit's, together
        self._lock = threading.Lock()
        self._memo: dict[tuple, object] = {}   # groups' features: every scheduler and layout of a step prices them

    def price(self, at: SimConfig, name: str, cp: int, groups: list[list[int]], pool_docs) -> float:
        """Seconds of a class: ``groups[k]`` the documents (lengths) of its ``k``-th group, each one
        micro-batch, under ``at``'s checkpointing and nano-batches; the fit's groups are drawn from
        ``pool_docs`` (the step's documents) the first time the setting is asked for."""
        return self.slowest(at, name, cp, groups, pool_docs, 1)[0][0]

    def slowest(self, at: SimConfig, name: str, cp: int, groups: list[list[int]], pool_docs,
                count: int) -> list[tuple[float, int]]:
        """``(seconds, index)`` of the ``count`` groups of a class priced slowest, slowest first (:meth:`price`)."""
        coef = np.asarray(self._fit(at, name, cp, pool_docs).coef)
        prices = np.stack([self.features(name, cp, g) for g in groups]) @ coef
        order = np.argsort(-prices, kind="stable")[:count]
        return [(float(prices[k]), int(k)) for k in order]

    def features(self, name: str, cp: int, docs: list[int]) -> np.ndarray:
        """:data:`FEATURES` of one group of ``cp`` ranks running ``name`` on ``docs``."""
        kind, ring = self._ring(name, cp)
        docs = tuple(docs)
        tokens, even = self._cheap(docs)
        layout = even if ring == 1 else self._layout(kind, ring, docs)
        return np.asarray([1.0, tokens / cp, even / cp, layout / cp])

    def _ring(self, name: str, cp: int) -> tuple[str, int]:
        """``name``'s token layout and the ranks it lays tokens out over: a 2-D mesh's ring (each ring
        rank's share split over its Ulysses ranks), else all ``cp``."""
        key = ("ring", name, cp)
        if key not in self._memo:
            entry = spec(name)
            ring = cp // entry.ulysses_axis(cp, plan_context(replace(self.cfg, cp=cp))) if entry.mesh_2d else cp
            self._memo[key] = (entry.layout or "zigzag", ring)
        return self._memo[key]

    def _cheap(self, docs: tuple[int, ...]) -> np.ndarray:
        """A group's tokens and forward attention seconds, each document at the kernel's speed for its length."""
        got = self._memo.get(docs)
        if got is None:
            lens = np.asarray(docs or (1,), dtype=np.int64)
            seconds = self.kernel.document_seconds("forward", lens, self.heads)
            got = self._keep(docs, np.asarray([float(lens.sum()), float(seconds.sum())]))
        return got

    def _layout(self, kind: str, ring: int, docs: tuple[int, ...]) -> float:
        """The busiest of ``ring`` ranks' forward attention seconds, times ``ring``, on layout ``kind``
        (:meth:`~.kernel.AttentionKernel.rank_seconds`)."""
        key = (kind, ring, docs)
        got = self._memo.get(key)
        if got is None:
            lens = [int(n) for n in docs] or [1]
            segments = layout_segments(Layout(kind).shards(lens, ring), lens, True, None)
            per_rank = self.kernel.rank_seconds(segments, ring, "forward", self.heads)
            got = self._keep(key, float(per_rank.max() * ring))
        return got

    def _keep(self, key, value):
        if len(self._memo) > MEMO_KEPT:
            self._memo.clear()
        self._memo[key] = value
        return value

    def _fit(self, at: SimConfig, name: str, cp: int, pool_docs) -> Fit:
        key = (name, cp, at.activation_checkpointing, at.mlp_chunk, at.nano_batches)
        with self._lock:
            if key in self.fits:
                return self.fits[key]
        t0 = time.perf_counter()
        groups = self._fit_groups(cp, pool_docs, two=(at.nano_batches or spec(name).nano_batches) > 1,
                                  seed=zlib.crc32(repr(key).encode()))
        x = np.stack([self.features(name, cp, g) for g in groups])
        y = np.asarray([self.replay(at, name, cp, [[g]]) for g in groups])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        error = float(np.max(np.abs(x @ coef / y - 1)))
        got = Fit(tuple(float(c) for c in coef), error, time.perf_counter() - t0)
        with self._lock:
            self.fits[key] = got
            self.fit_seconds += got.seconds
        return got

    def _fit_groups(self, cp: int, pool_docs, two: bool, seed: int) -> list[list[int]]:
        """:data:`FIT_GROUPS` groups of documents drawn from ``pool_docs``, each filling a random share of
        the group's room (``cp * rank_cap`` tokens); every :data:`LONG_EVERY`-th led by one long document.
        ``two``: each has two documents at least (a nano-batch count of 2 cuts only those)."""
        rng = np.random.default_rng(seed)
        room = cp * self.rank_cap
        lens = np.asarray([int(n) for n in pool_docs if 0 < n <= room] or [min(room, 1024)], dtype=np.int64)
        out = []
        for k in range(FIT_GROUPS):
            fill = int(rng.uniform(0.3, 1.0) * room)
            group = [int(rng.uniform(0.3, 0.9) * fill)] if k % LONG_EVERY == 0 else []
            for n in rng.choice(lens, size=min(len(lens) * 4, 4096)):
                if sum(group) + n <= fill:
                    group.append(int(n))
                if sum(group) >= 0.98 * fill:
                    break
            if two and len(group) < 2:
                group = [max(1, fill // 2), max(1, fill - fill // 2)]
            out.append(group or [max(1, fill)])
        return out


_SCREENS: dict = {}       # (job, network id) -> Screen: a job's fits outlive its steps
_SCREENS_LOCK = threading.Lock()
SCREENS_KEPT = 8


def screen_of(cfg: SimConfig, network, replay, rank_cap: int) -> Screen:
    """The job's :class:`Screen` (its fits kept from earlier steps): ``cfg`` less its draw (``seed``) and
    its checkpointing (set per step), on ``network`` (as :func:`~.per_batch.choose_step` is given it: the
    same object step after step); its fit groups sized by the first step's ``rank_cap`` (a global
    batch's tokens vary little from step to step)."""
    key = (replace(cfg, seed=0, activation_checkpointing=None, mlp_chunk=None), id(network))
    with _SCREENS_LOCK:
        if key not in _SCREENS:
            while len(_SCREENS) >= SCREENS_KEPT:
                _SCREENS.pop(next(iter(_SCREENS)))
            _SCREENS[key] = (Screen(cfg, replay, rank_cap), network)   # (held: its id names it)
        return _SCREENS[key][0]


__all__ = ["Screen", "Fit", "screen_of", "FIT_GROUPS", "FEATURES"]
