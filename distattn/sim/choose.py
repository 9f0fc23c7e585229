"""``distattn.choose``: the ``(scheduler, cp)`` of each micro-batch, for trainers we do not own.

Each micro-batch is priced alone on :mod:`.per_batch`'s model -- its documents packed over the CP
groups of each size as the trainer packs them, every scheduler that can share a step replayed --
under the one activation checkpointing every micro-batch fits."""

from __future__ import annotations

import math
from dataclasses import replace

from . import fit
from .job import SimConfig, links_of
from .dp import dp_seconds
from .per_batch import (PER_MICRO_BATCH, balanced_layout, class_time, fits_heads, lengths_of, pow2_divisors,
                        setting_index)


def choose(doc_lens_per_micro_batch, world_size: int, model, network=None, gpu: str = "h100",
           memory_gib: float | None = None, *, schedulers=PER_MICRO_BATCH, cps=None, dp_mode: str = "fsdp",
           dp_shard: int | None = None) -> list[tuple[str, int]]:
    """The ``(scheduler, cp)`` to run each micro-batch with, for a trainer that picks per micro-batch.

    Micro-batch ``i`` (``doc_lens_per_micro_batch[i]``: its documents' lengths, as ints) is trained by
    ``world_size`` ranks: with ``(scheduler, cp)`` they form ``world_size // cp`` CP groups of ``cp``
    ranks (aligned blocks: ranks ``[k * cp, (k + 1) * cp)``), its documents dealt out to them by
    :func:`distattn.pack_balanced`. Each is scored on the simulator's model -- the trainer's step on
    ``model`` (a :class:`~distattn.costmodel.model_shape.ModelShape`, a preset name such as ``"llama3-8b"``, or
    anything with a ``.shape``), ``dp_mode`` over the ``world_size`` ranks (``parallel.dp_mode``: ``ddp``,
    ``fsdp``, ``hsdp`` sharding over ``dp_shard`` ranks -- default a node's 8 -- or ``zero1``; its
    transfers and memory), ``gpu``'s kernel speed and
    memory (``memory_gib`` overrides it), ``network`` (a :class:`~distattn.costmodel.network.NetworkProfile`, a
    ``distattn cluster probe`` profile's path, or None: an H100 cluster's typical links) -- and the
    fastest is taken, under the one activation checkpointing every micro-batch fits (the cheapest
    for which each has a choice; the trainer's FSDP2 gathers must match across micro-batches).
    ``schedulers``: those to choose among (default, and at most: those that run one nano-batch
    without a pool, :data:`~.per_batch.PER_MICRO_BATCH`); ``cps``: the CP sizes (default: every power
    of two dividing ``world_size``; a trainer whose CP groups are fixed, such as Megatron's, passes its own:
    :class:`distattn.parallel.megatron.MicroBatchChoice`).

    Returns:
        ``[(scheduler, cp), ...]``, one per micro-batch.

    Raises:
        ValueError: a bad argument (named), or a micro-batch that fits no choice in memory.
    """
    from .memory_model import DP_MODES
    from ..costmodel.model_shape import GPUS, MODELS
    from ..costmodel.network import profile_of
    from ..planning.packing import DEFAULT_CAP_FACTOR, as_doc_lens
    from .kernel import AttentionKernel

    shape = MODELS.get(model) if isinstance(model, str) else getattr(model, "shape", model)
    if not hasattr(shape, "pair_weight"):
        raise ValueError(f"model {model!r}: pass a ModelShape, a model config with .shape, or a preset name "
                         f"({', '.join(MODELS)})")
    if gpu not in GPUS:
        raise ValueError(f"gpu {gpu!r} is unknown; choose from {', '.join(GPUS)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if memory_gib is not None and not memory_gib > 0:
        raise ValueError(f"memory_gib must be positive GiB, got {memory_gib!r}")
    for name in schedulers:
        if name not in PER_MICRO_BATCH:
            raise ValueError(f"schedulers: {name!r} is not one choose picks from; use some of "
                             f"{', '.join(PER_MICRO_BATCH)}")
    if dp_mode not in DP_MODES:
        raise ValueError(f"dp_mode {dp_mode!r} is unknown; choose from {', '.join(DP_MODES)}")
    if dp_shard is not None and (dp_mode != "hsdp" or isinstance(dp_shard, bool) or not isinstance(dp_shard, int)
                                 or dp_shard < 1 or world_size % dp_shard):
        raise ValueError(f"dp_shard {dp_shard!r}: with dp_mode 'hsdp', a positive int dividing world_size {world_size}"
                         f" (None: a node's ranks); else None")
    micro = [[int(n) for n in as_doc_lens(docs)] for docs in doc_lens_per_micro_batch]
    if not micro:
        raise ValueError("doc_lens_per_micro_batch is empty: give each micro-batch's document lengths")
    net = profile_of(network)
    card = GPUS[gpu] if memory_gib is None else replace(GPUS[gpu], memory_gib=float(memory_gib))
    longest = max(sum(docs) for docs in micro)
    cfg = SimConfig(shape, world_size, longest, 1, gpu=card, kernel=AttentionKernel.measured(card, shape.head_dim),
                    dp_mode=dp_mode, dp_shard=dp_shard)
    links = links_of(net, cfg)
    rank_cap = math.ceil(DEFAULT_CAP_FACTOR * longest / world_size)
    dp = dp_seconds(cfg, links.cp)
    sizes = pow2_divisors(world_size)
    if cps is not None:
        if not set(cps) <= set(sizes):
            raise ValueError(f"cps {list(cps)}: each must be a power of two dividing world_size {world_size}")
        sizes = list(cps)
    options = []   # per micro-batch: {(name, cp): (layout, setting index)}
    for docs in micro:
        mine = {}
        for cp in sizes:
            layout = balanced_layout(docs, world_size // cp, cp, 1, rank_cap * cp, shape.pair_weight())
            for name in (schedulers[:1] if cp == 1 else schedulers):
                if layout is None or not fits_heads(cfg, name, cp):
                    continue
                index = setting_index(cfg, name, cp, rank_cap * cp)
                if index is not None:
                    mine[name, cp] = (layout, index)
        if not mine:
            raise ValueError(f"a micro-batch of {sum(docs)} tokens fits no (scheduler, cp) in {card.memory_gib:g} GiB "
                             f"per GPU on {world_size} ranks")
        options.append(mine)
    need = max(min(index for _, index in mine.values()) for mine in options)
    at = replace(cfg, activation_checkpointing=fit.BY_COST[need][0], mlp_chunk=fit.BY_COST[need][1])
    out = []
    for docs, mine in zip(micro, options):
        timed = {key: class_time(at, key[0], key[1], [rounds for _, rounds in lengths_of(layout, docs)], links, dp,
                                 whole=False)
                 for key, (layout, index) in mine.items() if index <= need}
        out.append(min(timed, key=timed.get))
    return out


__all__ = ["choose"]
