"""The step that fits: each simulated row trains with the cheapest activation checkpointing the GPU's
memory holds, by the one memory model (:func:`distattn.sim.memory_model.estimate`, what ``distattn train
--dry-run`` prints) and the rule ``distattn train --dry-run --max-seq-len`` applies: the estimated
peak of one rank within the GPU's memory.

Settings, cheapest first (:data:`BY_COST`, the GPU report's order): no recomputation; ``selective``
(reruns the linear pieces); ``full`` (reruns each block, attention's transfers included); ``full``
with the MLP tiled (:data:`~distattn.sim.memory_model.TILED_MLP_CHUNK` tokens at a time, recomputed in
backward); ``offload`` with the MLP tiled (the kept block inputs in host memory). The estimate is of
the longest micro-batch the row's packing may give a replica (the token cap), as one document (the
estimate's worst case), so the setting holds for every step.

Tensor parallelism (``tp``) is beyond the estimate's model: each TP rank holds ``1/tp`` of the
weights (``dp_mode`` then shards them, or not, over the ``dp x cp`` ranks) and, with Megatron's sequence parallelism,
``1/tp`` of the activations and attention's buffers, so everything but the CUDA runtime is divided by
``tp`` -- an approximation the row's ``memory_gib`` carries.

``cad``'s attention servers keep what they receive or not (``cad_backward``): under ``auto`` a row
takes ``keep`` (the backward sends only dout) where it fits at the cheapest setting ``resend`` fits
at, else ``resend`` -- never more recomputation for less traffic.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from .memory_model import GIB, TILED_MLP_CHUNK, estimate
from ..schedulers import spec
from .job import job_facts

BY_COST = (("none", 0), ("selective", 0), ("full", 0), ("full", TILED_MLP_CHUNK), ("offload", TILED_MLP_CHUNK))


class Setting(NamedTuple):
    checkpointing: str
    mlp_chunk: int
    memory_gib: float
    fits: bool
    cad_backward: str | None = None   # cad's (resolved); None: the scheduler has no such choice


def memory_gib(cfg, entry_name: str, checkpointing: str, mlp_chunk: int, tokens: int,
               cad_backward: str | None = None) -> float:
    """One GPU's estimated peak (GiB) training micro-batches of ``tokens`` tokens with ``entry_name``'s
    plans on ``cfg``'s mesh (a :class:`~distattn.sim.simulate.SimConfig`): its ``dp_mode`` over the ``dp x cp``
    ranks of each TP rank (bf16, or fp32 for ``elem_bytes`` 4), ``cad`` pooling the replicas, its
    servers keeping what ``cad_backward`` says (None: ``cfg``'s, ``auto`` counted as ``resend``)."""
    facts = replace(job_facts(cfg, entry_name), activation_checkpointing=checkpointing, mlp_chunk=mlp_chunk)
    if cad_backward is not None:
        facts = replace(facts, cad_backward=cad_backward)
    est = estimate(facts.job(tokens))
    return ((est.total - est.runtime) / cfg.tp + est.runtime) / GIB


def choose(cfg, entry_name: str, tokens: int) -> Setting:
    """``cfg.activation_checkpointing`` (with ``cfg.mlp_chunk``) when set, else the cheapest setting of
    :data:`BY_COST` whose estimate fits ``cfg.gpu``; the most frugal one, not fitting, when none does.
    ``cad``: its servers' ``cfg.cad_backward``, or under ``auto`` ``keep`` (less traffic) where it fits at
    that setting, else ``resend`` (``parallel.cad_backward: auto``, the trainer's rule)."""
    if cfg.activation_checkpointing is not None:
        tried = [(cfg.activation_checkpointing, cfg.mlp_chunk or 0)]
    else:
        tried = list(BY_COST)
    backwards = [None]
    if "backward" in spec(entry_name).option_names():
        backwards = ["keep", "resend"] if cfg.cad_backward == "auto" else [cfg.cad_backward]
    for mode, chunk in tried:
        for backward in backwards:
            gib = memory_gib(cfg, entry_name, mode, chunk, tokens, backward)
            if gib <= cfg.gpu.memory_gib:
                return Setting(mode, chunk, gib, True, backward)
    return Setting(mode, chunk, gib, False, backward)


def with_setting(cfg, setting: Setting):
    """``cfg`` timed with ``setting``."""
    cfg = replace(cfg, activation_checkpointing=setting.checkpointing, mlp_chunk=setting.mlp_chunk)
    return cfg if setting.cad_backward is None else replace(cfg, cad_backward=setting.cad_backward)


__all__ = ["BY_COST", "Setting", "memory_gib", "choose", "with_setting"]
