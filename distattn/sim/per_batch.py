"""Choose per batch: each step's CP groups, the documents of each and its scheduler, on the simulator's model.

A fixed job runs one scheduler at one CP size for its whole life, so the step of thousands of 2K
documents pays the ring or all-to-all that only its one 400K document needed. :func:`choose_step`
looks at the step's documents and lays the ranks (of one TP index) out as CP groups of mixed
power-of-two sizes -- aligned blocks of the groups made at start-up, so ``[32, 16, 8, 4, 2, 1, 1]``
tiles 64 ranks -- each group one micro-batch with a scheduler of its own:

1. **Groups** (:func:`arrange`), for each size ``small`` of the groups of short documents: a document
   longer than ``small`` ranks hold (each rank at most ``rank_cap`` tokens: the token cap over the
   ranks), or heavier than their workload (``small`` mean ranks'), gets a group of its own, of the
   power of two ranks that hold it *and* bring its workload (tokens + the model's pair weight x its
   causal pairs) down to the mean rank's; the other ranks form groups of ``small``. The remaining
   documents go, heaviest first, to the group whose ranks' workload stays lowest with it, within its
   token room.
2. **Scheduler per group size**: each size's groups (a *class*) are priced with each scheduler that
   can run them, at one and at two nano-batches (:data:`NANO_CHOICES`), and take the fastest --
   priced by the closed-form screen (:mod:`.screen`: four numbers of each group, their coefficients
   fitted per setting once per job to :func:`class_time`, the trainer's step -- its layers, the
   recomputation its checkpointing runs, the job's data-parallel transfers (``dp_mode``, :mod:`.dp`) over
   every rank of it, the kernel and link tables
   -- replayed on those groups' ranks). Every class runs the step's one activation checkpointing
   (FSDP2's gathers must match on every rank): the cheapest that every class fits with one scheduler
   at least.
3. **The step**: of the :data:`FINALISTS` best-screened layouts and the fixed choice, each replayed
   (:func:`class_time`: each class's groups the screen prices slowest; not a layout the screen prices
   :data:`SURE_LOSS` times the fixed choice's step or slower), the one with the lowest
   predicted step, which is its slowest class's time. Classes are replayed apart: every layer has the
   same pieces, so the slowest class is the slowest at each of FSDP's collectives, and a faster class
   only waits there (the collectives' waits are not replayed across classes).

A group may run ``cad``: over its own ranks (no pool across groups: :func:`class_time` plans each
group alone). A class's nano-batches are cut alike over it (every group of its size and scheduler),
one where any of them holds a single document, as the trainer cuts them. FSDP2 gathers
each block once per pass whatever the nano-batches (``distattn/train/model/fsdp_once.py``), so
groups of one and of two nano-batches share a step. :func:`distattn.choose` (:mod:`.choose`), for
trainers we do not own, chooses among :data:`PER_MICRO_BATCH`: one nano-batch, no pool.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..planning.packing import pack_balanced, workload
from ..schedulers import NAMES, spec
from . import fit
from .job import Links, SimConfig, attention_kernel, links_of, plan_context, with_planning
from .dp import DataParallel, dp_seconds
from .micro import micro_batch
from .replay import replay
from .screen import screen_of
from .step import step_ops

FINALISTS = 1              # the screen's best layouts replayed (choose_step)
SURE_LOSS = 1.15           # a layout screened this much slower than the fixed choice is not replayed
SCORED_GROUPS = 4          # groups of a size replayed to score a layout (class_time)
NANO_CHOICES = (1, 2)      # a class's nano-batches (choose_step), as the sweep tries a fixed row's
SPREADS = (1.0, 2.0, 4.0)   # a long document's group: its ranks' workload over the mean rank's (arrange)
# the schedulers a step's groups may run (module docstring): every one, cad over its own group's ranks
MIXED = NAMES
# those distattn.choose picks among, one per micro-batch of a trainer we do not own: one nano-batch,
# no pool (and what a fixed parallel.scheduler may be under parallel.cp: auto)
PER_MICRO_BATCH = tuple(n for n in NAMES if not spec(n).pools and spec(n).nano_batches == 1)


@dataclass(frozen=True)
class Group:
    """One CP group of a step: ``cp`` ranks from ``first`` (a rank of one TP index), running
    ``scheduler`` on its micro-batches: ``rounds[j]`` the lengths of the ``j``-th's documents,
    ``pieces[j]`` their indices in the step's ``doc_lens``; ``pooled``: one plan over every group of
    the step (a fixed ``cad`` choice pools all replicas), else the group's own; ``nano_batches``: each
    micro-batch's (cut alike over the groups of its size and scheduler: one where any holds a single
    document)."""

    scheduler: str
    cp: int
    first: int
    rounds: tuple[tuple[int, ...], ...]
    pieces: tuple[tuple[int, ...], ...] = ()
    pooled: bool = False
    nano_batches: int = 1


@dataclass(frozen=True)
class StepChoice:
    """A step's groups (largest first, tiling the ranks in order), its activation checkpointing, its
    predicted seconds and the seconds choosing it took (``fitting_s`` of them: the screen's fits of the
    settings first met, once per job: :mod:`.screen`)."""

    groups: tuple[Group, ...]
    checkpointing: str
    mlp_chunk: int
    predicted_step_s: float
    planning_s: float = 0.0
    fitting_s: float = 0.0

    @property
    def choice(self) -> list[tuple[str, int]]:
        """``(scheduler, cp)`` of each micro-batch (group), as ``metrics.jsonl``'s ``choice`` lists them."""
        return [(g.scheduler, g.cp) for g in self.groups]

    def layout(self) -> list[list]:
        """``[scheduler, cp, piece indices, pooled, nano-batches]`` per group (one micro-batch each), as
        JSON carries the choice to the trainer's ranks (:mod:`distattn.train.auto_plan`)."""
        return [[g.scheduler, g.cp, list(g.pieces[0]), g.pooled, g.nano_batches] for g in self.groups]


def pow2_divisors(n: int) -> list[int]:
    """The powers of two that divide ``n``: the CP sizes whose groups tile ``n`` ranks."""
    return [1 << k for k in range(int(math.log2(n)) + 1) if n % (1 << k) == 0]


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0)) - 1e-12))


def arrange(doc_lens, ranks: int, rank_cap: int, small: int, pair_weight: float,
            spread: float = 1.0) -> list[tuple[int, list[list[int]]]] | None:
    """Step 1 of the module docstring: ``[(cp, [document indices]), ...]`` (one micro-batch a group,
    as :func:`balanced_layout` lists them), largest group first, tiling ``ranks``, each at most
    ``rank_cap`` tokens a rank; a long document's group brings its workload down to ``spread`` times
    the mean rank's (fewer ranks than even: less communication). None when the long documents need
    more ranks than there are."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    work = workload(lens, pair_weight) if len(lens) else np.zeros(0)
    target = float(work.sum()) / ranks        # the mean rank's workload over the step
    order = np.argsort(-work, kind="stable")
    sizes: list[int] = []
    members: list[list[int]] = []
    load: list[float] = []
    rest = []
    for i in order:
        n = int(lens[i])
        if n <= small * rank_cap and work[i] <= small * spread * target:
            rest.append(i)   # (a group of small holds it, and its workload)
            continue
        size = min(ranks, _pow2_at_least(max(n / rank_cap, work[i] / max(spread * target, 1e-30))))
        # a group of this size with room for its workload and tokens takes it
        for g, s in enumerate(sizes):
            if s == size and (load[g] + work[i]) / s <= spread * target and \
                    sum(int(lens[k]) for k in members[g]) + n <= s * rank_cap:
                members[g].append(int(i))
                load[g] += float(work[i])
                break
        else:
            sizes.append(size)
            members.append([int(i)])
            load.append(float(work[i]))
    if sum(sizes) > ranks or (ranks - sum(sizes)) % small:
        return None
    free = (ranks - sum(sizes)) // small
    sizes += [small] * free
    members += [[] for _ in range(free)]
    load += [0.0] * free
    cp = np.asarray(sizes, dtype=np.float64)
    room = cp * rank_cap - np.asarray([sum(int(lens[i]) for i in m) for m in members], dtype=np.float64)
    per_rank = np.asarray(load) / cp
    for i in rest:
        after = per_rank + work[i] / cp
        after[room < lens[i]] = np.inf
        g = int(np.argmin(after))
        if not np.isfinite(after[g]):
            return None
        members[g].append(int(i))
        room[g] -= lens[i]
        per_rank[g] = after[g]
    return sorted(((sizes[g], [sorted(members[g])]) for g in range(len(sizes))), key=lambda x: -x[0])


def fits_heads(cfg: SimConfig, name: str, cp: int) -> bool:
    """Whether ``name`` can split ``cfg``'s heads (a TP rank's) over ``cp`` ranks."""
    return cfg.model.n_heads // cfg.tp >= spec(name).head_split(cp, plan_context(replace(cfg, cp=cp)))


def class_time(cfg: SimConfig, name: str, cp: int, groups: list[list[list[int]]], links: Links,
               dp: DataParallel | None, whole: bool = True, pool: bool = False) -> float:
    """The step of ``len(groups)`` groups of ``cp`` ranks running ``name`` (``groups[k][j]``: the
    documents of group ``k``'s ``j``-th micro-batch) under ``cfg``'s checkpointing, the data-parallel transfers
    those of every rank of the job (``dp``, :func:`.dp.dp_seconds`): the slowest of those ranks' end.

    ``whole=False`` is what scoring a layout needs, at a fraction of the replay: only the
    :data:`SCORED_GROUPS` groups with the most workload and the most tokens a rank (the groups do not
    wait for each other, so the slowest is among them; a pool's: all, one plan), replayed for three and
    four layers, each rank's difference extended to the model's layers (every layer runs the same
    pieces). ``pool``: a scheduler that pools (``cad``) plans the groups as one pool, as a fixed
    ``cad`` row does; else each group alone."""
    if spec(name).pools and not pool and len(groups) > 1:
        # each group plans its own cad, and their programs differ: each is replayed alone (they share only
        # FSDP's collectives), its nano-batches cut as its class's are (alike, as the trainer cuts them);
        # of a large class, the groups with the most workload and tokens a rank
        one = _cut_alike(cfg, name, groups)
        if len(groups) > SCORED_GROUPS:   # (whole too: a replay per group of a large class costs seconds)
            groups = _scored(cfg, groups)
        return max(class_time(one, name, cp, [g], links, dp, whole) for g in groups)
    if not whole and len(groups) > SCORED_GROUPS and not pool:   # (a pool is one plan: every group of it)
        groups = _scored(cfg, groups)
    at = replace(cfg, cp=cp, gpus=cp * len(groups) * cfg.tp, batch=None)
    kernel = attention_kernel(at)
    micro = [micro_batch(at, name, [g[j] for g in groups], kernel, links, pool=pool)["micro"]
             for j in range(len(groups[0]))]
    n = at.ranks
    part = None if dp is None else dp.on(n)

    def end(layers):
        run = replay(step_ops(micro, layers, at.activation_checkpointing, n, part), n, slowdown=cfg.comm_slowdown)
        return run.compute + run.stalled
    layers = cfg.model.n_layers
    if whole or layers <= 5:
        return float(end(layers).max())
    # each rank's end extended from the fourth layer's (the first layers differ: FSDP's first gather is not
    # prefetched, and a group that waits at FSDP's collectives for a slower one reaches its pace by the
    # third): the rank that ends last after four layers -- the most tokens, for the output layer -- need not
    # after all of them
    three, four = end(3), end(4)
    return float((four + (layers - 4) * (four - three)).max())


@dataclass(frozen=True)
class Candidate:
    """How a layout's classes run: ``pool``, one ``cad`` plan over every group (a fixed ``cad`` row), else
    each group's own; ``nano_batches``, a fixed row's (None: each class takes the faster of
    :data:`NANO_CHOICES`)."""

    pool: bool = False
    nano_batches: int | None = None


def choose_step(cfg: SimConfig, doc_lens, network, schedulers=MIXED, cps=None,
                fixed: tuple | list[tuple] | None = None) -> StepChoice:
    """The step's :class:`StepChoice` (module docstring) for the global batch ``doc_lens`` on ``cfg``'s
    job (its GPUs, TP, model, GPU, token cap factor; ``cfg.cp`` is not used), choosing among
    ``schedulers`` (of :data:`MIXED`), group sizes ``cps`` (default: every power of two the ranks
    allow; one size fixes every group's: ``parallel.cp`` set, ``scheduler: auto``), one micro-batch a
    group (as the trainer runs a step). ``fixed``: ``(scheduler, cp, micro-batches)`` (and, a fourth,
    its nano-batches where not the scheduler's default), the job's fixed choice, or several, also
    replayed on the step (its documents packed as the trainer packs them, :func:`distattn.pack_balanced`;
    a ``cad`` one pooled over every group, as a fixed ``cad`` runs): kept when no mixed layout beats
    it, so a step is never predicted slower than the fixed choice."""
    t0 = time.perf_counter()
    for name in schedulers:
        if name not in MIXED:
            raise ValueError(f"scheduler {name!r} is unknown; choose from {', '.join(MIXED)}")
    links = links_of(network, cfg)
    ranks = cfg.gpus // cfg.tp
    lens = [int(n) for n in doc_lens]
    total = sum(lens)
    if total < 1:
        raise ValueError("doc_lens: the global batch has no tokens")
    sizes = pow2_divisors(ranks)
    # short documents' groups stay inside a node (larger groups are for the documents that need them,
    # and the fixed choice, a layout of one large size, is replayed besides)
    smalls = [c for c in sizes if c <= max(1, cfg.gpus_per_node // cfg.tp)] if cps is None else \
        [c for c in cps if c in sizes]
    if not smalls:
        raise ValueError(f"cps {cps}: no power of two among them divides the {ranks} ranks")
    dp = dp_seconds(replace(cfg, cp=1), links.cp)
    pw = cfg.model.pair_weight()
    timed: dict[tuple, float] = {}

    rank_cap = math.ceil(cfg.token_cap_factor * total / ranks)
    screen = screen_of(cfg, network, lambda at, name, cp, groups:
                       class_time(at, name, cp, groups, links, dp, whole=False), rank_cap)
    fitted = screen.fit_seconds

    def screened(at, name, cp, groups, how):
        return screen.price(_cut_alike(at, name, groups), name, cp, [g[0] for g in groups], lens)

    def replayed(at, name, cp, groups, how):
        if not how.pool and len(groups) > SCORED_GROUPS and all(len(g) == 1 for g in groups):
            # a mixed class: the groups the screen prices slowest
            at = _cut_alike(at, name, groups)
            groups = [groups[k] for _, k in screen.slowest(at, name, cp, [g[0] for g in groups], lens, SCORED_GROUPS)]
        key = (name, cp, at.activation_checkpointing, at.mlp_chunk, how, tuple(tuple(map(tuple, g)) for g in groups))
        if key not in timed:
            timed[key] = class_time(at, name, cp, groups, links, dp, whole=False, pool=how.pool)
        return timed[key]

    scored = []   # (screened step, layout, scheduler per size, setting, how) of every layout that fits
    for small, spread in itertools.product(smalls, SPREADS):
        if small * rank_cap >= max(lens) and spread != SPREADS[0]:
            continue   # no document is long enough for its own group: the spread changes nothing
        layout = arrange(lens, ranks, rank_cap, small, pw, spread)
        if layout is None or (cps is not None and any(c not in cps for c, _ in layout)):
            continue
        scored.append(_score(cfg, lengths_of(layout, lens), rank_cap, schedulers, timed, screened, layout))
    # the fixed choice and the screen's best layouts replayed: the step is the best of them (a layout the
    # screen prices SURE_LOSS slower than the fixed choice's replay is not replayed: it would not win)
    finalists = []
    for name, cp, m, *nano in [] if fixed is None else [fixed] if isinstance(fixed[0], str) else fixed:
        # packed as the fixed row packs it: its cap, its seed, tokens alone where it pools (.workload)
        layout = balanced_layout(lens, ranks // cp, cp, m, math.ceil(cfg.token_cap_factor * total * cp / (ranks * m)),
                                 0.0 if spec(name).pools else pw, cfg.seed)
        if layout is not None:
            cap = math.ceil(cfg.token_cap_factor * total / (ranks * m))
            how = Candidate(spec(name).pools, spec(name).nano_batches_for(nano[0] if nano else None))
            finalists.append(_score(cfg, lengths_of(layout, lens), cap, (name,), timed, replayed, layout, how=how))
    beat = min((got[0] for got in finalists if got is not None), default=math.inf) * SURE_LOSS
    best = sorted((got for got in scored if got is not None and got[0] < beat), key=lambda got: got[0])[:FINALISTS]
    finalists += [_score(cfg, lengths_of(got[1], lens), rank_cap, schedulers, timed, replayed, got[1], only=got[2])
                  for got in best]
    finalists = [got for got in finalists if got is not None]
    if not finalists:
        raise ValueError(f"no layout of {ranks} ranks fits {cfg.gpu.memory_gib:.0f} GiB per GPU for this batch's "
                         f"{len(lens)} documents: add GPUs or shorten the sequences")
    step, layout, names, setting, how = min(finalists, key=lambda got: got[0])
    sized = lengths_of(layout, lens)
    groups, first = [], 0
    for (cp, docs), (_, which) in zip(sized, layout):
        name, nano = names[cp]
        groups.append(Group(name, cp, first, tuple(map(tuple, docs)), tuple(map(tuple, which)), how.pool, nano))
        first += cp
    return StepChoice(tuple(groups), setting[0], setting[1], step, time.perf_counter() - t0,
                      screen.fit_seconds - fitted)


def replayed_whole(cfg: SimConfig, choice: StepChoice, network) -> float:
    """``choice``'s step replayed whole: every layer, every group of each class (of a ``cad`` class
    planned group by group, its :data:`SCORED_GROUPS` heaviest) -- what ``simulate --per-batch`` reports,
    as the fixed rows are timed; choosing replays for four layers and extends them."""
    links = links_of(network, cfg)
    dp = dp_seconds(replace(cfg, cp=1), links.cp)
    at = replace(cfg, activation_checkpointing=choice.checkpointing, mlp_chunk=choice.mlp_chunk)
    classes: dict[tuple, list] = {}
    for g in choice.groups:
        classes.setdefault((g.scheduler, g.cp, g.nano_batches, g.pooled), []).append([list(r) for r in g.rounds])
    return max(class_time(_cut_alike(replace(at, nano_batches=nano), name, groups), name, cp, groups, links, dp,
                          pool=pooled) for (name, cp, nano, pooled), groups in classes.items())


def balanced_layout(doc_lens, dp: int, cp: int, rounds: int, token_cap: int, pair_weight: float,
                    seed: int = 0) -> list[tuple[int, list[list[int]]]] | None:
    """``dp`` groups of ``cp`` ranks, ``rounds`` micro-batches each, dealt out by
    :func:`distattn.pack_balanced` (the trainer's balanced packing), as :func:`arrange` gives them;
    None when a document is held."""
    lens = [int(n) for n in doc_lens]
    if max(lens, default=0) > token_cap:
        return None
    packed = pack_balanced(lens, dp, rounds, token_cap, pair_weight, seed)
    if len(packed.held):
        return None
    return [(cp, [sorted(packed[r][j]) for j in range(rounds)]) for r in range(dp)]


def lengths_of(layout, lens: list[int]) -> list[tuple[int, list[list[int]]]]:
    return [(cp, [[lens[i] for i in r] for r in rounds]) for cp, rounds in layout]


def _scored(cfg: SimConfig, groups: list) -> list:
    """The :data:`SCORED_GROUPS` of ``groups`` with the most workload and the most tokens a rank."""
    pw = cfg.model.pair_weight()
    heavy = sorted(range(len(groups)), key=lambda k: -sum(workload(r, pw).sum() for r in groups[k] if r))
    most = max(range(len(groups)), key=lambda k: sum(map(sum, groups[k])))
    keep = heavy[:SCORED_GROUPS - 1] + ([most] if most not in heavy[:SCORED_GROUPS - 1] else heavy[-1:])
    return [groups[k] for k in keep]


def _score(cfg: SimConfig, layout, rank_cap: int, schedulers, memo: dict, price, kept=None,
           how: Candidate = Candidate(), only: dict[int, tuple[str, int]] | None = None):
    """(predicted step, ``kept``, ``(scheduler, nano-batches)`` per group size, (checkpointing, mlp_chunk),
    ``how``) of one layout (documents by length), or None: nothing fits. Each class (the groups of one
    size) takes the scheduler and nano-batch count (of :data:`NANO_CHOICES`; ``how``'s where it has one)
    ``price(cfg, name, cp, groups, how)`` finds fastest (``only``: the pair given for it); the step is
    the slowest class."""
    by_cp: dict[int, list[list[list[int]]]] = {}
    for cp, docs in layout:
        by_cp.setdefault(cp, []).append(docs)
    # the step's checkpointing: the cheapest every class fits with one of its schedulers at least
    able = {cp: [n for n in (schedulers[:1] if cp == 1 and only is None else schedulers)
                 if (only is None or only[cp][0] == n) and fits_heads(cfg, n, cp)] for cp in by_cp}
    index = {(n, cp): setting_index(cfg, n, cp, rank_cap * cp, memo) for cp in by_cp for n in able[cp]}
    need = 0
    for cp in by_cp:
        fitting = [index[n, cp] for n in able[cp] if index[n, cp] is not None]
        if not fitting:
            return None
        need = max(need, min(fitting))
    setting = fit.BY_COST[need]
    at = replace(cfg, activation_checkpointing=setting[0], mlp_chunk=setting[1])

    def nanos(name, cp):   # (one rank: nothing to hide a transfer behind)
        if only is not None:
            return (only[cp][1],)
        if how.nano_batches is not None or cp == 1:
            return (how.nano_batches or spec(name).nano_batches_for(None),)
        return NANO_CHOICES
    names, step = {}, 0.0
    for cp, replicas in by_cp.items():
        best = min(((price(replace(at, nano_batches=nano), name, cp, replicas, how), (name, nano))
                    for name in able[cp] if index[name, cp] is not None and index[name, cp] <= need
                    for nano in nanos(name, cp)), key=lambda x: x[0])
        names[cp] = best[1]
        step = max(step, best[0])
    return step, kept, names, setting, how


def _cut_alike(cfg: SimConfig, name: str, groups) -> SimConfig:
    """``cfg`` at one nano-batch where a class's groups are not all cut into its nano-batches: the trainer
    cuts a class's groups alike, and a group of one document is not cut."""
    if (cfg.nano_batches or spec(name).nano_batches) > 1 and any(len(r) < 2 for g in groups for r in g):
        return replace(cfg, nano_batches=1)
    return cfg


def setting_index(cfg: SimConfig, name: str, cp: int, tokens: int, memo: dict | None = None) -> int | None:
    """The index in :data:`~.fit.BY_COST` of the cheapest setting ``name`` fits at on groups of ``cp``
    ranks with ``tokens`` tokens a group, or None (kept in ``memo``)."""
    key = ("memory", name, cp, tokens)
    if memo is not None and key in memo:
        return memo[key]
    at, found = replace(cfg, cp=cp), None
    for i, (mode, chunk) in enumerate(fit.BY_COST):
        if fit.memory_gib(at, name, mode, chunk, tokens) <= cfg.gpu.memory_gib:
            found = i
            break
    if memo is not None:
        memo[key] = found
    return found


def best_fixed(rows: list[dict]) -> dict | None:
    """The fastest real row (median step) of :func:`.sweep.rows`' ``rows``: the fixed (scheduler, CP) a
    user would pick for the job, ``wlb`` included (bounds are not choices)."""
    from .presets import BOUNDS

    timed = [r for r in rows if r["scheduler"] not in BOUNDS and r.get("step_time_s") is not None]
    return min(timed, key=lambda r: r["step_time_s"]) if timed else None


def per_batch_row(cfg: SimConfig, network, batches, draws: int, rows: list[dict], schedulers=MIXED,
                  progress: Callable[[str], None] | None = None) -> dict:
    """``simulate --per-batch``'s row: every draw's step (``batches(cfg, d)``, the draws
    :func:`.sweep.rows` timed ``rows`` on) with each step chosen by :func:`choose_step` and replayed
    whole (:func:`replayed_whole`, as the rows are) -- the best
    fixed row's (scheduler, CP, micro-batches) among the layouts when the row can mix -- and its
    planning, which is hidden behind the step before as ``cfg.planning`` says (less the screen's fits:
    once per job, ``screen_fit_s``, not a step's); summarised as
    :func:`.sweep.summary` summarises a row, with ``best_fixed`` (``{scheduler, cp}``) and the
    paired per-draw ``speedup_vs_best_fixed`` (its step over this one's: median, p10, p90), and
    ``choices``: how many micro-batches of the draws took each ``"scheduler cp"``."""
    from .sweep import put_ratio, summary

    best = best_fixed(rows)
    fixed = None
    if best is not None and best["scheduler"] in MIXED:   # at the setting the row ran (the sweep's nano-batches)
        fixed = (best["scheduler"], best["cp"], best["micro_batches"], best.get("nano_batches"))
    if best is not None and best.get("dp_mode"):   # the best fixed row's data-parallel mode (the sweep's)
        cfg = replace(cfg, dp_mode=best["dp_mode"], dp_shard=best.get("dp_shard"))
    if best is not None and best.get("cad_backward") and cfg.cad_backward == "auto":
        # cad's servers as the best fixed row resolved them (keep where it fits), for its pooled candidate and
        # the groups of cad alike (the trainer's auto runs its planner's default, resend)
        cfg = replace(cfg, cad_backward=best["cad_backward"])
    per_draw, counts = [], {}
    for d in range(draws):
        chunks = batches(cfg, d)
        docs = [n for chunk in chunks for n in chunk]
        got = choose_step(replace(cfg, seed=cfg.seed + d), docs, network, schedulers, fixed=fixed)
        step = with_planning(cfg, replayed_whole(cfg, got, network), got.planning_s - got.fitting_s)
        for key in (f"{name} {cp}" for name, cp in got.choice):
            counts[key] = counts.get(key, 0) + 1
        per_draw.append({"scheduler": "per-batch", "gpus": cfg.gpus, "tp": cfg.tp, "seq_len": cfg.seq_len,
                         "batch": len(chunks), "model": cfg.model.name, "checkpointing": got.checkpointing,
                         "mlp_chunk": got.mlp_chunk, "fits": True, "step_time_s": step,
                         "planning_s": got.planning_s - got.fitting_s, "fitting_s": got.fitting_s,
                         "groups": len(got.groups)})
        if progress is not None:
            progress(f"per-batch: draw {d + 1} of {draws}: {step:.2f} s, {len(got.groups)} groups "
                     f"(chosen in {got.planning_s:.2f} s" +
                     (f", {got.fitting_s:.1f} s of it fitting the screen)" if got.fitting_s else ")"))
    row = summary(per_draw)
    row["groups"] = float(np.median([r["groups"] for r in per_draw]))
    row["screen_fit_s"] = float(sum(r["fitting_s"] for r in per_draw))   # (once per job: not a step's)
    row.pop("fitting_s")
    row["choices"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    if best is not None:
        row["best_fixed"] = {"scheduler": best["scheduler"], "cp": best["cp"]}
        theirs = np.asarray(best["step_times_s"][:draws])
        if len(theirs) == draws:
            put_ratio(row, "speedup_vs_best_fixed", theirs / np.asarray(row["step_times_s"]))
    return row


__all__ = ["MIXED", "PER_MICRO_BATCH", "SPREADS", "FINALISTS", "SURE_LOSS", "SCORED_GROUPS", "NANO_CHOICES",
           "Candidate", "Group", "StepChoice", "arrange", "balanced_layout", "lengths_of", "pow2_divisors",
           "fits_heads", "setting_index", "class_time", "choose_step", "replayed_whole", "best_fixed", "per_batch_row"]
