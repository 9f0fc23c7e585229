"""Run a config through Ray Train's ``TorchTrainer``, on a running Ray cluster or a local one.

Ray starts ``dp * cp`` workers, sets up the process group (gloo on CPUs, nccl on GPUs) and the
usual ``RANK``/``LOCAL_RANK`` variables; each worker then runs the same ``train`` as torchrun does.
Metrics, TensorBoard and checkpoints go to ``train.out``, which must be on storage every node sees.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..extras import require
from ..train.config import RunConfig


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None       # None: RAY_ADDRESS, a cluster started here with `ray start`, else a new local one
    num_cpus: int | None = None      # CPUs of a new local cluster (default: all)
    gpus_per_worker: int = 0         # 0: CPU workers with gloo
    cpus_per_worker: float | None = None  # default: share the cluster's CPUs evenly, at most 1 per worker


def _worker(config: dict) -> None:
    import torch

    from ..train.trainer import train

    cfg, resume, allow_reshape = config["cfg"], config["resume"], config.get("allow_reshape", False)
    # CPU ranks share the node's cores instead of each taking all of them
    torch.set_num_threads(max(1, int(config["threads"])))
    train(cfg, resume, allow_reshape=allow_reshape)


def ray_train(cfg: RunConfig, opts: RayOptions, resume: bool = False, allow_reshape: bool = False) -> dict:
    """Train ``cfg`` on ``dp * cp`` Ray workers; returns the last row of ``train.out/metrics.jsonl``."""
    require("ray", "ray", "distattn launch --backend ray")
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if opts.gpus_per_worker < 0 or (opts.cpus_per_worker is not None and opts.cpus_per_worker <= 0):
        raise ValueError("--gpus-per-node must be >= 0 and --ray-cpus-per-worker > 0")
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.address, num_cpus=opts.num_cpus if opts.address is None else None,
                 include_dashboard=False, log_to_driver=True)
    world = cfg.world_size
    cpus = opts.cpus_per_worker or min(1.0, ray.cluster_resources().get("CPU", 1.0) / world)
    resources = {"CPU": cpus} | ({"GPU": opts.gpus_per_worker} if opts.gpus_per_worker else {})
    out = Path(cfg.train.out).resolve()
    cfg = cfg.replace(train={"out": str(out)})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "resume": resume, "allow_reshape": allow_reshape, "threads": max(1, int(cpus))},
        torch_config=TorchConfig(backend="nccl" if opts.gpus_per_worker else "gloo",
                                 timeout_s=int(cfg.parallel.timeout_s)),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=bool(opts.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=f"distattn-{int(time.time())}", storage_path=str(out / "ray")),
    )
    try:
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    if result.error is not None:
        raise RuntimeError(f"distattn: the Ray job failed: {result.error}")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    return json.loads(rows[-1]) if rows else {}
