"""The training loop: DP x CP over a DeviceMesh, packed documents, metrics, checkpoints.

``distattn train CONFIG`` runs :func:`train` on every rank. Without a launcher
it starts ``dp * cp`` local gloo processes itself; under torchrun (``RANK`` in
the environment) it joins the launcher's process group (nccl on GPUs).

The loss is next-token cross-entropy that never crosses a document boundary,
summed over this rank's tokens and divided by the number of labelled tokens
of the whole global batch (all DP and CP ranks). DDP and FSDP2 average
gradients over the world, so the local loss is scaled by the world size: the
averaged gradient is then exactly the gradient of the global mean loss.

With ``parallel.scheduler: cad`` and dp > 1, each step plans CAD over the pool of all dp x cp
ranks (``parallel.cad_pool``, default on): every replica's attention is balanced against every
other's, so no replica straggles at the gradient all-reduce. The pool is the world group (made at
start-up), the plan exchanges the replicas' document lengths, and shard/unshard stay inside each
replica's CP group. ``flops_imbalance`` in the metrics is over the ranks the plan balanced (the
pool, or rank 0's CP group); ``flops_imbalance_all`` is over all dp x cp ranks either way.

Steps are counted from 1 everywhere: step ``n`` is the ``n``-th optimizer update, and the
console, ``metrics.jsonl``, TensorBoard and the checkpoint ``ckpt/step_n`` all call it ``n``.

SIGTERM (how Slurm preempts) makes every rank finish its step, save a checkpoint and stop;
the ranks agree on the step through the loss all-reduce every step makes anyway.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..api import plan as make_plan
from ..masks import next_token_labels
from ..schedule import imbalance
from ..spawn import Terminated
from . import checkpoint
from .config import RunConfig
from .data import Packer, make_corpus
from .model import Transformer


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _wrap(model, cfg: RunConfig, mesh):
    if cfg.world_size == 1:
        return model
    if cfg.parallel.dp_mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        flat = mesh._flatten("dp_cp")
        for layer in model.layers:
            fully_shard(layer, mesh=flat)
        return fully_shard(model, mesh=flat)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


class _Logger:
    """Rank 0's progress line, ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, out: Path, steps: int, done: int):
        """``done``: steps already taken (a resume); rows logged after them by the run that
        stopped are dropped, so each step appears once."""
        out.mkdir(parents=True, exist_ok=True)
        self.steps, self.start = steps, time.perf_counter()
        path = out / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= done] \
            if done and path.exists() else []
        self.jsonl = open(path, "w")
        self.jsonl.writelines(line + "\n" for line in kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=done + 1 if done else None)
        except ImportError:  # tensorboard is optional outside the dev extra
            self.tb = None
        self.first_step = None

    def log(self, m: dict) -> None:
        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, val in m.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", val, m["step"])
        if self.first_step is None:
            self.first_step, self.start = m["step"], time.perf_counter() - m["step_time_s"]
        done = m["step"] - self.first_step + 1
        eta = (time.perf_counter() - self.start) / done * (self.steps - m["step"])
        print(f"step {m['step']:>5}/{self.steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
              f"grad {m['grad_norm']:.2f}  {m['tokens_per_s']:,.0f} tok/s  attn-imb {m['flops_imbalance_all']:.2f}  "
              f"eta {int(eta) // 60}:{int(eta) % 60:02d}", flush=True)

    def close(self):
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """Remembers a SIGTERM (handler installed from the main thread only) until the step ends."""

    def __init__(self):
        self.received, self.stopped_at, self._previous = False, None, None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def _note(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: RunConfig, resume: bool = False, stop: StopSignal | None = None,
          on_step: Callable[[dict], Any] | None = None) -> list[dict]:
    """Run on every rank of an initialised process group of ``cfg.world_size`` ranks; returns the metrics.
    With ``stop``, a SIGTERM it received ends the run after the current step and its checkpoint;
    ``on_step(metrics)`` is called on every rank after each step (progress, profiling)."""
    from ..mesh import ParallelDims
    from ..schedulers.usp import default_ulysses_degree

    p, t = cfg.parallel, cfg.train
    if dist.get_world_size() != cfg.world_size:
        raise ValueError(f"parallel.dp * parallel.cp = {cfg.world_size} but the job has {dist.get_world_size()} ranks")
    # the launcher's group says where tensors live: nccl under torchrun, gloo for local processes
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ulysses = (p.ulysses_degree or default_ulysses_degree(p.cp, cfg.model.n_kv_heads)) \
        if p.scheduler == "usp" and p.cp > 1 else 1
    dims = ParallelDims(p.dp, p.cp, ulysses)
    mesh = dims.build(device.type)  # every process group of the run, made once here
    cp_mesh, dp_rank = dims.cp_mesh(mesh), mesh.get_local_rank("dp")
    torch.manual_seed(t.seed)  # same initial weights everywhere
    model = _wrap(Transformer(cfg.model).to(device), cfg, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    packer = Packer(make_corpus(cfg.data.source, cfg.data.path), cfg.data.seq_len, cfg.data.seed)
    out = Path(t.out)
    start = 0
    if resume:
        last = checkpoint.newest_usable(out / "ckpt")
        if last is None:
            raise ValueError(f"--resume: no checkpoint under {out / 'ckpt'}")
        start, data_state = checkpoint.load(last, model, optimizer)
        packer.load_state(data_state)
    logger = _Logger(out, t.steps, start) if dist.get_rank() == 0 else None
    options = {"num_kv_heads": cfg.model.n_kv_heads} if p.scheduler == "usp" and p.cp > 1 else {}
    pooled = p.pools_replicas
    if pooled:
        # the pool is every dp x cp rank: the world group, which exists already (train() runs on
        # exactly dp * cp ranks, checked above), so steps make no group; each plan exchanges the
        # replicas' document lengths over it and CAD's all-to-alls cross replicas
        options["pool"] = dist.group.WORLD
    history = []
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        tokens_np, doc_lens = packer.next_batch(p.dp, dp_rank)
        tokens = torch.from_numpy(tokens_np).to(device)
        labels = next_token_labels(tokens, doc_lens)
        plan = make_plan(doc_lens, cp_mesh, scheduler=p.scheduler, backend=p.backend, **options)
        logits = model(plan.shard(tokens), plan.position_ids(device), plan)
        local_labels = plan.shard(labels)
        loss_sum = F.cross_entropy(logits.float(), local_labels, ignore_index=-100, reduction="sum")
        count = (local_labels != -100).sum().to(torch.float64)
        dist.all_reduce(count)
        (loss_sum / count * cfg.world_size).backward()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        s0 = time.perf_counter()
        stats = plan.stats(cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.dim // cfg.model.n_heads)
        bookkeeping = time.perf_counter() - s0  # metrics, not training: left out of the step time
        # one all-reduce gives the loss, whether any rank got SIGTERM (so all stop at this step) and,
        # when replicas are planned apart, every rank's attention FLOPs (its own slot, the others
        # zero) for the imbalance over all dp x cp ranks; a pooled plan's stats list them all already
        gather_flops = p.dp > 1 and not pooled
        total = torch.zeros(2 + (cfg.world_size if gather_flops else 0), dtype=torch.float64, device=device)
        total[0] = loss_sum.detach()
        total[1] = float(stop is not None and stop.received)
        if gather_flops:
            total[2 + dist.get_rank()] = float(stats["flops"][plan.rank])
        dist.all_reduce(total)
        total_loss, stopping, *world_flops = total.tolist()
        step_time = time.perf_counter() - t0 - bookkeeping
        m = {"step": step + 1, "loss": total_loss / count.item(), "lr": lr_at(cfg, step),
             "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
             "tokens_per_s": p.dp * cfg.data.seq_len / step_time, "step_time_s": step_time,
             "flops_imbalance": stats["flops_imbalance"],
             "flops_imbalance_all": imbalance(world_flops) if world_flops else stats["flops_imbalance"]}
        history.append(m)
        if on_step is not None:
            on_step(m)
        if logger is not None and (step % t.log_every == 0 or step + 1 == t.steps or stopping):
            logger.log(m)
        if (step + 1) % t.ckpt_every == 0 or step + 1 == t.steps or stopping:
            checkpoint.save(out / "ckpt" / f"step_{step + 1}", model, optimizer, step + 1, packer.state())
        if stopping:
            stop.stopped_at = step + 1
            break
    if logger is not None:
        logger.close()
    return history


def _rank_entry(cfg: RunConfig, resume: bool) -> list[dict]:
    with StopSignal() as stop:
        return train(cfg, resume, stop)


def run(cfg: RunConfig, resume: bool = False) -> list[dict]:
    """Train under torchrun (``RANK`` set) or on ``dp * cp`` local gloo processes; returns rank 0's metrics."""
    if "RANK" in os.environ:
        # torchrun --max-restarts restarts the workers with the same arguments: pick up the last checkpoint
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = resume or checkpoint.newest_usable(Path(cfg.train.out) / "ckpt") is not None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with StopSignal() as stop:
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.parallel.timeout_s))
            try:
                history = train(cfg, resume, stop)
            finally:
                dist.destroy_process_group()
        if stop.stopped_at is not None:
            raise Terminated(f"stopped by SIGTERM after step {stop.stopped_at}", [history])
        return history
    from ..spawn import run_distributed

    threads = max(1, (os.cpu_count() or 1) // cfg.world_size)
    return run_distributed(_rank_entry, cfg.world_size, cfg, resume, timeout=7 * 24 * 3600.0,
                           collective_timeout=cfg.parallel.timeout_s, threads_per_rank=threads)[0]
