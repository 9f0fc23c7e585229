"""How a run's ranks start and stop: the process group they join (:func:`join_group`), the model
wrapped for data parallelism over them (:func:`wrap_model`) and the signal that stops them at a step
boundary (:class:`StopSignal`)."""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import RunConfig
from ..distributed.mesh import ParallelDims
from .model.transformer import Block


class StopSignal:
    """Remembers a SIGTERM, SIGINT or SIGUSR1 (handlers installed from the main thread only) until the
    step ends. Once one came, leaving ignores further ones: the run is already stopping (a launcher
    repeats the signal until its ranks are done), and its results must reach the caller. SIGUSR1 is
    Slurm's warning before the time limit (``#SBATCH --signal=USR1@SECONDS``): a stop that was asked
    for, so the run exits 0 (:attr:`distattn.distributed.spawn.Terminated.exit_code`) and torchrun restarts nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum, self.stopped_at, self._previous = None, None, {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def _note(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received else previous)


def process_group_backend(cfg: RunConfig, cuda: bool) -> str:
    """The launcher's process group: nccl on GPUs -- with gloo beside it for ``cpu_offload``, whose
    gradients (and so the gradient norm's all-reduce) live in host memory -- else gloo."""
    if not cuda:
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cfg.parallel.cpu_offload else "nccl"


def join_group(cfg: RunConfig) -> bool:
    """Make the run's process group unless the caller has: torchrun's (``RANK`` set), or a single
    rank's for a config of world size 1. Returns whether it made one (the caller then ends it).
    ``ValueError`` for a config of several ranks started without a launcher."""
    if dist.is_initialized():
        return False
    launched = "RANK" in os.environ
    if not launched and cfg.world_size != 1:
        raise ValueError(f"parallel.dp * parallel.cp = {cfg.world_size} ranks: start this under torchrun "
                         f"--nproc-per-node {cfg.world_size}, or run `distattn train CONFIG`, which starts local "
                         f"processes itself")
    alone = {} if launched else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    dist.init_process_group(process_group_backend(cfg, torch.cuda.is_available()),
                            timeout=timedelta(seconds=cfg.parallel.timeout_s), **alone)
    return True


def shard_ranks(cfg: RunConfig) -> int:
    """``hsdp``'s shard group: ``parallel.dp_shard``, unset the launcher's ranks per node (torchrun's
    ``LOCAL_WORLD_SIZE``; local processes all share one machine). ``ValueError`` when it does not divide the ranks."""
    world = cfg.world_size
    shard = cfg.parallel.dp_shard or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % shard:
        raise ValueError(f"dp_mode: hsdp shards over the {shard} ranks of a node, which do not divide the dp x cp = "
                         f"{world} ranks: set parallel.dp_shard to a divisor of {world}")
    return shard


def wrap_model(model, cfg: RunConfig, mesh, dims: ParallelDims):
    """FSDP2 over every rank (``fsdp``) or on the 2-D ``(replicate, shard)`` mesh (``hsdp``) -- bf16:
    ``MixedPrecisionPolicy``, bf16 compute copies of fp32 shards, fp32 gradient reduction;
    ``cpu_offload``: ``CPUOffloadPolicy`` --, DDP (bf16: the step autocasts; see :func:`_autocast`), or
    the bare model: on one rank, and under ``zero1``, whose :class:`~.zero1.Zero1` optimizer hooks it."""
    if cfg.wrapper in ("single", "zero1"):
        return model
    if cfg.wrapper in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)

        on = dims.dp_mesh(mesh, shard_ranks(cfg) if cfg.wrapper == "hsdp" else None)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.train.dtype == "bf16" else MixedPrecisionPolicy()
        # pinned host memory needs CUDA; on CPU ranks the shards stay where they are (the same path runs)
        offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.parallel.cpu_offload \
            else OffloadPolicy()
        for layer in model.layers:
            fully_shard(layer, mesh=on, mp_policy=mp, offload_policy=offload)
            # nano-batches call a block's pieces apart (Transformer.forward): each a forward method, all
            # of a block's sharing one gather (model.fsdp_once.GatherOnce)
            for method in Block.FORWARD_METHODS:
                register_fsdp_forward_method(layer, method)
        return fully_shard(model, mesh=on, mp_policy=mp, offload_policy=offload)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def make_optimizer(model, cfg: RunConfig, mesh, dims: ParallelDims):
    """AdamW over the (wrapped) model's parameters, or under ``zero1`` over this rank's share of them
    (:class:`~.zero1.Zero1`, which casts the model to the training dtype)."""
    t = cfg.train
    settings = {"lr": t.lr, "betas": (0.9, 0.95), "weight_decay": t.weight_decay}
    if cfg.wrapper == "zero1":
        from .zero1 import Zero1

        return Zero1(model, dims.dp_mesh(mesh), torch.bfloat16 if t.dtype == "bf16" else None, **settings)
    return torch.optim.AdamW(model.parameters(), **settings)
