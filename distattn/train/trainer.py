"""The training loop: DP x CP over a DeviceMesh, packed documents, metrics, checkpoints.

``distattn train CONFIG`` runs a :class:`Trainer` on every rank (:func:`run`). Without a launcher
it starts ``dp * cp`` local gloo processes itself; under torchrun (``RANK`` in
the environment) it joins the launcher's process group (nccl on GPUs). Each step's plans come
from the Trainer's :class:`~distattn.runtime.plan_cache.PlanCache`: a batch of documents seen recently is
not planned again (a pooled ``cad`` plan is given every replica's documents: no collective).

The loss is next-token cross-entropy that never crosses a document boundary,
summed over this rank's tokens and divided by the number of labelled tokens
of the whole global batch (all DP and CP ranks). Every ``parallel.dp_mode`` -- DDP, FSDP2, HSDP
(FSDP2 on a 2-D mesh: :func:`.ranks.wrap_model`) and ZeRO-1 (:mod:`.zero1`) -- averages gradients over
the world, so the local loss is scaled by the world size: the averaged gradient is then exactly the
gradient of the global mean loss, and every mode trains alike (``tests/test_dp_modes.py``).

With ``parallel.scheduler: cad`` and dp > 1, each step plans CAD over the pool of all dp x cp
ranks (``parallel.cad_pool``, default on): every replica's attention is balanced against every
other's, so no replica straggles at the gradient all-reduce. The pool is the world group (made at
start-up), every rank gives the plan every replica's document lengths (it knows them: the global
batch is cut alike everywhere), and shard/unshard stay inside each replica's CP group.
``flops_imbalance`` in the metrics is over the ranks the plan balanced (the pool, or rank 0's CP
group); ``flops_imbalance_all`` is over all dp x cp ranks either way.

Each micro-batch runs as ``parallel.nano_batches`` nano-batches of whole documents
(:func:`.plan_ahead.agreed_nano_batches`; unset: one or two, whichever the simulator prices faster for
the run, :mod:`.nano_default`), one plan each, ping-ponged through the model's blocks
(:mod:`distattn.runtime.pingpong`): the loss and gradients are those of one. A step's batch, nano-batches and
plans are made while the step before runs (``parallel.plan_ahead``, default on; :mod:`.plan_ahead`:
a background thread, no collective on it, the same plans): ``planning_s`` in the metrics is what a
step still waited for them, ``plan_made_s`` what making them took.

With ``parallel.cp: auto`` or ``parallel.scheduler: auto`` (:mod:`.auto_plan`) each step lays the
``world_size`` ranks out as CP groups of its own choosing -- sizes, documents and a scheduler per
group -- on meshes made here for every CP size; a rank runs its group's one plan, and the loss,
normalisation and gradient synchronisation are the fixed configuration's. Its metrics add ``choice``,
``predicted_step_s`` and ``choice_late``. A rank's tokens stay within ``data.token_cap / (world_size /
dp)``, what the memory estimate of the fixed choice assumes.

Precision (``train.dtype``): ``bf16`` computes in bf16 and keeps fp32 master weights, fp32
gradient reduction and fp32 AdamW state -- FSDP2 and HSDP through its ``MixedPrecisionPolicy``, ZeRO-1
with bf16 parameters beside its fp32 master shares, DDP (and a single rank) by autocasting the forward. Attention accumulates in fp32 either way. Activation
checkpointing (``train.activation_checkpointing``) and the chunked output projection + loss
(``train.loss_chunk``) are the model's (``model.py``, ``loss.py``). Per step, ``metrics.jsonl`` gets
MFU (``metrics.py``), tokens/s per device, peak memory and the communication wait (max over ranks)
besides loss, learning rate and gradient norm, and ``dp_imbalance``: how evenly ``data.packing``
dealt the step's global batch to the DP ranks (:mod:`.global_batch`).

Steps are counted from 1 everywhere: step ``n`` is the ``n``-th optimizer update, and the
console, ``metrics.jsonl``, TensorBoard and the checkpoint ``ckpt/step_n`` all call it ``n``.

A step whose global loss or gradient norm is not finite updates nothing: with ``train.on_nonfinite:
stop`` (default) the run ends there with :class:`NonFinite` (the newest checkpoint is the last
good state), with ``skip_step`` it goes on and the step is logged with ``"skipped": true``.

SIGTERM (how Slurm preempts) or Ctrl-C makes every rank finish its step, save a checkpoint and
stop; the ranks agree on the step through the loss all-reduce every step makes anyway. A save
that fails (a full disk, a read-only folder) stops the run with ``WriteFailed``: one line, the
cause and the path, and the checkpoints before it intact (:mod:`.checkpoint`). A rank that hangs or
dies during start-up, a save, the checkpoint agreement or the load stops the others with
:class:`~distattn.distributed.comm.PeerFailed`: one line naming the phase, the path and the rank when known.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from ..distributed.comm import peer_phase
from ..runtime.plan_cache import PlanCache
from ..planning.schedule import imbalance
from ..distributed.spawn import Terminated
from ..distributed.trace import BACKWARD, FORWARD, OPTIMIZER, PLAN, span
from .checkpoint import dcp as checkpoint, manifest
from .checkpoint.retention import keep_newest
from .auto_plan import auto_meshes, describe_choice, late_choice, make_planner
from .config import RunConfig
from .data.packer import Packer
from .data.sources import make_corpus
from .data.global_batch import GlobalBatches, MicroBatch
from .metrics import RunLog, check_progress, device_peak_flops, peak_memory_bytes, progress_display, \
    resolve_progress
from .model.batch import LocalBatch
from .model.transformer import Transformer
from .nano_default import STEPS as NANO_STEPS, chosen_nano_batches
from .plan_ahead import PlanAhead, StepPlanner, StepPlans, agreed_cad_backward, plan_options
from .preflight import prepare_out
from .profile import StepProfiler
from .ranks import StopSignal, join_group, make_optimizer, wrap_model
from .step_calibration import StepCalibration
from .zero1 import Zero1
from .checkpoint.resume import reshape_line, reshaped, resume_config, resume_from, run_info, schedule_steps

_log = logging.getLogger(__name__)   # (a Trainer's RunLog is its `logger`)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at step ``train.lr_decay_steps`` (unset:
    ``train.steps``; a resume takes the checkpoint's, :mod:`.resume`), ``min_lr`` after it."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, schedule_steps(cfg) - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(cfg: RunConfig, device: torch.device):
    """bf16 under DDP or on one rank: autocast runs the matmuls in bf16 on fp32 parameters (DDP then
    reduces fp32 gradients); FSDP's policy casts the parameters itself, ZeRO-1 keeps them in bf16, and
    fp32 runs as written."""
    if cfg.train.dtype == "bf16" and cfg.wrapper in ("ddp", "single"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Trainer:
    """One run on every rank: ``setup()`` (process groups and mesh, model, optimizer, data, resume),
    then ``step()`` (one optimizer update -> its metrics), ``log(metrics)``, ``checkpoint()`` when due,
    and ``close()``; ``run()`` does all of it. Embedded in a script::

        from distattn.train.config import load_config
        from distattn.train.trainer import Trainer
        cfg = load_config("tiny", ["parallel.cp=1", "train.steps=3", "train.out=runs/script"])
        Trainer(cfg, progress="line").run()   # a line a step; about 15 s in all on 2 CPU cores

    As ``distattn train`` does, a new run refuses a ``train.out`` that holds one (``ValueError``) unless
    ``resume`` (continue it) or ``overwrite=True`` (delete its metrics, events and checkpoints first).
    ``callbacks`` (or :meth:`on_step`) are called on every rank with each step's metrics dict (W&B or
    any logger attaches there). ``resume``, ``stop`` and ``allow_reshape`` are :func:`train`'s. ``progress``
    is what rank 0 shows per step: ``"bar"`` (tqdm), ``"line"`` (one printed line per logged step, what ``distattn
    train`` shows off a terminal), ``"log"`` (that line as a record of the ``distattn`` logger at
    INFO), ``"none"``, or ``"auto"`` (default): a bar on a terminal, else ``"log"`` -- so
    ``distattn.configure_logging("ERROR")`` silences the steps, ``"INFO"`` shows them. Without an initialised
    process group, :meth:`setup` makes one: torchrun's (``RANK`` set), or a single rank's for a config
    of world size 1; :meth:`close` ends the group it made.
    """

    def __init__(self, config: RunConfig, callbacks: Iterable[Callable[[dict], Any]] = (), *,
                 resume: bool | Path = False, stop: StopSignal | None = None, progress: str = "auto",
                 overwrite: bool = False, allow_reshape: bool = False):
        if resume and overwrite:
            raise ValueError("resume continues the run in train.out and overwrite deletes it: pass one of them")
        self.config, self.callbacks, self.resume, self.stop = config, list(callbacks), resume, stop
        self.overwrite, self.allow_reshape = overwrite, allow_reshape
        self.reshaped: list[str] | None = None   # a resume's changed batch geometry: marks its first step's row
        self.progress = check_progress(progress)
        self.history: list[dict] = []
        self.done = 0             # optimizer updates taken, a resumed run's included
        self.stopping = False     # a rank got SIGTERM or SIGINT: every rank checkpoints and stops after this step
        # the plans of recent batches (a plan depends on the documents and the options only: a pooled
        # cad plan is given every replica's documents); only the planner (.plan_ahead) uses it
        self.plans = PlanCache()
        self.ahead: PlanAhead | None = None
        self.auto = None          # parallel.cp/scheduler: auto's planner (.auto_plan)
        self.calibration = StepCalibration() if config.parallel.auto else None   # its predictions on this machine
        self._last_choice = None  # auto's, logged where it changes
        self.logger: RunLog | None = None
        self.optimizer = None
        self._own_group = False

    def on_step(self, fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
        """Call ``fn(metrics)`` after every step (usable as a decorator)."""
        self.callbacks.append(fn)
        return fn

    @property
    def finished(self) -> bool:
        """Whether the run has taken its ``train.steps`` steps, or stopped on a signal."""
        return self.done >= self.config.train.steps or self.stopping

    def run(self) -> list[dict]:
        """Set up, step until done (checkpointing when due), close; returns every step's metrics. On an
        error the run's files stay as its last step left them; a process group it made is ended."""
        try:
            self.setup()
            with StepProfiler(self.config.train.profile_steps, self.out, dist.get_rank()) as profiler:
                while not self.finished:
                    with profiler.step(self.done + 1):   # (steps count from 1, a resumed run's included)
                        metrics = self.step()
                    self.log(metrics)
                    if self.checkpoint_due:
                        self.checkpoint()
            if self.stopping and self.stop is not None:
                self.stop.stopped_at = self.done
            self.close()
        finally:
            self._stop_planning()   # (before the group ends: the thread may still be planning on it)
            self._end_group()
        return self.history

    def setup(self) -> "Trainer":
        """Join (or make) the process group, build the mesh, model, optimizer and data, and resume. A
        rank that does not join, or dies meanwhile, is :class:`~distattn.distributed.comm.PeerFailed` (one line)."""
        with peer_phase("start-up", self.config.train.out, self.config.parallel.timeout_s):
            return self._setup()

    def _setup(self) -> "Trainer":
        from ..distributed.mesh import ParallelDims
        from ..schedulers import spec

        self._own_group = join_group(self.config)
        cfg, p, t = self.config, self.config.parallel, self.config.train
        if not self.resume and dist.get_rank() == 0:
            # as `distattn train` refuses it (which has made the folder ready by now: this finds it so)
            prepare_out(cfg, False, self.overwrite, say=_log.info)
        if dist.get_world_size() != cfg.world_size:
            raise ValueError(f"parallel.dp * parallel.cp = {cfg.world_size} but the job has {dist.get_world_size()} "
                             f"ranks: launch it with torchrun --nproc-per-node {cfg.world_size}, or run `distattn "
                             f"train CONFIG`, which starts local processes")
        # the launcher's group says where tensors live: nccl under torchrun, gloo for local processes
        self.device = device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if "nccl" in dist.get_backend() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        cp = p.fixed_cp
        dims = ParallelDims(p.dp, cp, spec(p.fixed_scheduler).ulysses_axis(cp, cfg.plan_context()))
        mesh = dims.build(device.type)  # every process group of the run, made once here
        self.cp_mesh, self.dp_rank = dims.cp_mesh(mesh), mesh.get_local_rank("dp")
        # auto: every CP size's groups too (.auto_plan), so that no step makes a group
        self.meshes = auto_meshes(cfg, device.type) if p.auto else None
        if t.deterministic:
            # cuBLAS needs a fixed workspace to reduce in a fixed order; the variable is read when
            # cuBLAS starts, which is later in this process (the model is not on the device yet)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(t.seed)  # same initial weights everywhere
        # with cpu_offload the parameters stay in host memory: fully_shard brings one module at a time over
        model = Transformer(cfg.model).to("cpu" if p.cpu_offload else device)
        if t.compile:
            model.compile_blocks()
        self.model = wrap_model(model, cfg, mesh, dims)
        self.optimizer = make_optimizer(self.model, cfg, mesh, dims)
        # pooled cad spreads attention over every rank itself: the packer evens out tokens alone
        self.batches = GlobalBatches(Packer(make_corpus(cfg.data), cfg.data.seq_len, cfg.data.seed,
                                            cfg.model.vocab_size), p.dp,
                                     cfg.packing, cfg.data.cap, cfg.model.shape.pair_weight(), cfg.data.seed,
                                     balance_weight=0.0 if p.pools_replicas else None)
        self.out = Path(t.out)
        # the nano-batch choice prices the stream's first steps whatever step a resume starts at
        self.first_steps = self.batches.peek_lengths(NANO_STEPS) \
            if p.nano_batches is None and not p.auto and dist.get_rank() == 0 else None
        self._resume()
        bar, say = progress_display(self.progress)
        self.logger = RunLog(self.out, t.steps, self.done, bar, say) if dist.get_rank() == 0 else None
        self._planning()
        self.forward = {"checkpointing": t.activation_checkpointing, "loss_chunk": t.loss_chunk,
                        "mlp_chunk": t.mlp_chunk, "compute_dtype": torch.bfloat16 if t.dtype == "bf16" else None}
        return self

    def _planning(self) -> None:
        """The device's peak FLOP/s (MFU's denominator), the options of every step's plans and the planner
        making each step's batch and plans (:mod:`.plan_ahead`: on its thread with ``parallel.plan_ahead``)."""
        cfg, p = self.config, self.config.parallel
        self.peak_flops = device_peak_flops(self.device, cfg.train.peak_tflops)
        self.cad_backward = agreed_cad_backward(cfg, self.device)
        self.options = plan_options(cfg, self.peak_flops, self.cad_backward, self.device)
        # from here the planner alone moves self.batches (maybe ahead, on its thread): a checkpoint
        # stores the data state right after the batch of the last step run, which its StepPlans carried
        self.data_state = self.batches.state()
        if p.auto:
            self.auto = auto = make_planner(cfg, dist.get_rank(), self.batches, self.plans, self.meshes, self.options,
                                            self.done)
            self.ahead = PlanAhead(auto.fixed, p.plan_ahead, self.device, refine=auto.choose)
            return
        self.nano_batches = chosen_nano_batches(cfg, self.first_steps, self.cad_backward)
        planner = StepPlanner(self.batches, self.dp_rank, self.plans, self.cp_mesh, p.scheduler, p.backend,
                              self.nano_batches, cfg.model.shape.pair_weight(), self.options)
        self.ahead = PlanAhead(planner, p.plan_ahead, self.device)

    def _resume(self) -> None:
        """Load the checkpoint ``resume`` names: a path (verified by the caller) or True, the newest
        one whose checksums hold (the ranks hash their shares)."""
        if not self.resume:
            return
        ckpt = self.out / "ckpt"
        last = self.resume if isinstance(self.resume, Path) else checkpoint.agreed_checkpoint(ckpt, say=_log.info)
        if last is None:
            raise ValueError(f"--resume: no checkpoint under {ckpt}")
        found = manifest.read(last)   # (the launching process printed what else changed)
        self.config = resume_config(self.config, found, allow_reshape=self.allow_reshape)
        if (line := reshape_line(self.config, found)) is not None:
            self.reshaped = reshaped(self.config, found)
            if dist.get_rank() == 0:
                _log.warning("--allow-reshape: %s; its first step's metrics row says \"reshaped\"", line)
        with peer_phase(f"loading checkpoint {last.name}", last):
            self.done, data_state = checkpoint.load(last, self.model, self.optimizer)
        self.batches.load_state(data_state)

    def step(self) -> dict:
        """One optimizer update on the next global batch -> its metrics (the same on every rank). A
        step whose loss or gradient norm is not finite updates nothing: :class:`NonFinite` or, with
        ``train.on_nonfinite: skip_step``, metrics with ``"skipped": true``."""
        cfg, t, step = self.config, self.config.train, self.done
        t0 = time.perf_counter()
        with span(PLAN):
            ready, planning, refined = self.ahead.take(more=step + 1 < t.steps)   # and starts the next step's
            late = None
            if refined is not None:
                ready, late = self._choice(ready, refined, step + 1)
        batch, parts, plans = ready.batch, ready.parts, ready.plans
        tokens, doc_lens = torch.from_numpy(batch.tokens).to(self.device), batch.doc_lens
        # a cached plan's wait clock runs over its life: this step's wait is what the step adds to each
        # plan (counted once where two nano-batches share one)
        waited = {id(plan): (plan, plan.comm_wait_seconds()) for plan in plans}
        local = LocalBatch.shard(tokens, doc_lens, parts, plans)
        with span(FORWARD), _autocast(cfg, self.device):
            loss_sum = self.model(local, **self.forward)
        # the labelled tokens and the loss of the whole global batch, in one all-reduce
        sums = torch.stack([local.labelled().to(torch.float64), loss_sum.detach().to(torch.float64)])
        dist.all_reduce(sums)
        count = sums[0]
        with span(BACKWARD):
            (loss_sum / count * cfg.world_size).backward()
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        with span(OPTIMIZER):
            grad_norm = self.optimizer.clip_grad_norm_(t.grad_clip) if isinstance(self.optimizer, Zero1) \
                else torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        bad = _nonfinite(sums[1] / count, norm)   # the same on every rank: both are global
        if bad is None:
            with span(OPTIMIZER):
                self.optimizer.step()
        elif t.on_nonfinite == "stop":
            raise NonFinite(f"step {step + 1}: {bad}; stopped before updating the model (train.on_nonfinite: "
                            f"stop, or skip_step to skip such steps)")
        self.optimizer.zero_grad(set_to_none=True)
        m = self._metrics(t0, plans, list(waited.values()), loss_sum, count, norm, batch, (planning, ready.made_s))
        p = self.config.parallel
        m["choice"] = ready.choice or [[p.scheduler, p.cp]] * p.dp
        if self.auto is not None and m["choice"] != self._last_choice and dist.get_rank() == 0:
            self._last_choice = m["choice"]
            _log.info("step %d: auto runs %s%s", step + 1, describe_choice(m["choice"]),
                      " (its choice was late: the fixed one)" if late else "")
        m["predicted_step_s"] = ready.predicted_step_s
        if self.calibration is not None and ready.predicted_step_s is not None:
            m["model_step_s"] = ready.predicted_step_s   # (the chooser's model; predicted: on this machine)
            m["predicted_step_s"] = self.calibration.predict(ready.predicted_step_s)
            self.calibration.add(ready.predicted_step_s, m["step_time_s"])
        if late is not None:
            m["choice_late"] = late   # the choice was not ready on every rank: the fixed choice ran
        if bad is not None:
            m["skipped"] = True
        self.done, self.data_state = step + 1, ready.data_state
        return m

    def _choice(self, fixed, refined, step: int) -> tuple[StepPlans, bool]:
        """``auto``: the step's choice when every rank has it ready, else the fixed choice, planned now
        (logged); and whether it was late."""
        ready = torch.tensor([float(refined.done())], dtype=torch.float64, device=self.device)
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)
        if ready.item() < 1:
            late_choice(step, fixed)
            return self.auto.fallback(fixed), True
        self.ahead.settled()
        return refined.result(), False

    def _metrics(self, t0: float, plans: list, waited: list, loss_sum: torch.Tensor, count: torch.Tensor,
                 norm: torch.Tensor, batch: MicroBatch, planning: tuple[float, float]) -> dict:
        """The step's metrics, reduced over every rank (``waited``: each plan and its wait clock before the
        step; ``planning``: the seconds the step waited for its plans and making them took, :mod:`.plan_ahead`);
        ``dp_imbalance`` and the tokens trained come from the global batch (:mod:`.global_batch`)."""
        cfg, device = self.config, self.device
        m_cfg, hd = cfg.model, cfg.model.dim // cfg.model.n_heads
        s0 = time.perf_counter()
        # attention FLOPs per rank of the plans' ranks, every nano-batch's summed
        rank_flops = [sum(f) for f in zip(*(plan.stats(m_cfg.n_heads, m_cfg.n_kv_heads, hd)["flops"]
                                            for plan in plans))]
        # one sum gives the loss, whether any rank got SIGTERM (so all stop at this step) and every
        # rank's attention FLOPs (its own slot, the others zero: the imbalance over all dp x cp
        # ranks, and the model FLOPs of MFU); one max gives the peak memory and the comm wait
        total = torch.zeros(2 + cfg.world_size, dtype=torch.float64, device=device)
        total[0] = loss_sum.detach()
        total[1] = float(self.stop is not None and self.stop.received)
        # a pooled plan's stats list every rank of the pool (the world, slot = global rank); plan.slot
        # is this rank's place in its CP group, which indexes an unpooled plan's stats
        total[2 + dist.get_rank()] = float(rank_flops[plans[0].slot])
        wait = sum(plan.comm_wait_seconds() - before for plan, before in waited)
        worst = torch.tensor([peak_memory_bytes(device), wait, *planning], dtype=torch.float64, device=device)
        bookkeeping = time.perf_counter() - s0  # metrics, not training: left out of the step time
        dist.all_reduce(total)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        total_loss, stopping, *world_flops = total.tolist()
        peak_mem, comm_wait, planning_s, plan_made_s = worst.tolist()
        self.stopping = bool(stopping)
        step_time = time.perf_counter() - t0 - bookkeeping
        tokens = batch.trained   # (held pieces leave a step with fewer than dp * seq_len)
        reshaped, self.reshaped = self.reshaped, None   # (the first step after a reshaping resume says so)
        flops = m_cfg.shape.model_flops(tokens, sum(world_flops))
        peak = self.peak_flops
        return {"step": self.done + 1, "loss": total_loss / count.item(), "lr": lr_at(cfg, self.done),
                "grad_norm": float(norm),
                "tokens_per_s": tokens / step_time, "tokens_per_s_per_device": tokens / step_time / cfg.world_size,
                "step_time_s": step_time, "mfu": None if peak is None else flops / (step_time * cfg.world_size * peak),
                "model_tflops": flops / 1e12, "peak_memory_gib": peak_mem / 2**30, "comm_wait_s": comm_wait,
                "planning_s": planning_s, "plan_made_s": plan_made_s,
                "flops_imbalance": imbalance(rank_flops), "flops_imbalance_all": imbalance(world_flops),
                "dp_imbalance": batch.imbalance, **({} if batch.held is None else {"held_documents": batch.held}),
                **({} if reshaped is None else {"reshaped": reshaped})}

    def log(self, metrics: dict) -> None:
        """A step is done: into the history, to every callback, and (rank 0) to the console,
        ``metrics.jsonl`` and TensorBoard every ``train.log_every`` steps, the last and a stopping one."""
        self.history.append(metrics)
        for fn in self.callbacks:
            fn(metrics)
        if self.logger is not None:
            n, t = metrics["step"], self.config.train
            self.logger.step(metrics, record=(n - 1) % t.log_every == 0 or n == t.steps or self.stopping
                             or "reshaped" in metrics)

    @property
    def checkpoint_due(self) -> bool:
        """Every ``train.ckpt_every`` steps, at the last step, and when stopping."""
        t = self.config.train
        return self.done % t.ckpt_every == 0 or self.done == t.steps or self.stopping

    def checkpoint(self) -> None:
        """Save ``ckpt/step_N`` (N: the steps taken) on every rank: model, optimizer, data cursor, run info;
        with ``train.keep_last`` rank 0 then deletes the complete checkpoints older than the newest N."""
        keep = self.config.train.keep_last
        checkpoint.save(self.out / "ckpt" / f"step_{self.done}", self.model, self.optimizer, self.done,
                        self.data_state, run_info(self.config), keep_last=keep)
        if keep is not None and dist.get_rank() == 0:   # (save returned: every rank agreed it succeeded)
            keep_newest(self.out / "ckpt", keep, self.out / "ckpt" / f"step_{self.done}", say=_log.info)

    def _stop_planning(self) -> None:
        if self.auto is not None and self.auto.shared is not None:
            self.auto.shared.abandon(dist.get_rank())   # (a rank's thread may wait for rank 0's next choice)
        if self.ahead is not None:
            self.ahead.close()
        if self.auto is not None:
            self.auto.close()

    def _end_group(self) -> None:
        if self._own_group:
            self._own_group = False
            dist.destroy_process_group()

    def close(self) -> None:
        """Close the run's log (metrics.jsonl, TensorBoard), end the planning thread (a batch it took for
        a step that will not run is dropped), drop the plans, end a process group setup made."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if isinstance(self.optimizer, Zero1):
            self.optimizer.synchronize()   # (the last step's gathers: the model holds its final weights)
        self._stop_planning()
        self.plans.clear()
        self._end_group()


def train(cfg: RunConfig, resume: bool | Path = False, stop: StopSignal | None = None,
          on_step: Callable[[dict], Any] | None = None, progress: str = "auto",
          allow_reshape: bool = False) -> list[dict]:
    """Run on every rank of an initialised process group of ``cfg.world_size`` ranks; returns the metrics.
    ``resume``: True continues from the newest checkpoint whose checksums hold (the ranks hash their
    shares); a path continues from that checkpoint, which the caller has verified already. With ``stop``,
    a SIGTERM or SIGINT it received ends the run after the current step and its checkpoint;
    ``on_step(metrics)`` is called on every rank after each step (progress, profiling); ``progress``
    is :class:`Trainer`'s; ``allow_reshape``: a resume may change the batch geometry (``--allow-reshape``:
    :func:`.checkpoint.resume.reshaped`)."""
    return Trainer(cfg, [] if on_step is None else [on_step], resume=resume, stop=stop, progress=progress,
                   allow_reshape=allow_reshape).run()


class NonFinite(RuntimeError):
    """A step's loss or gradient norm was not finite and ``train.on_nonfinite`` is ``stop``."""


def _nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
    """``None`` if both are finite, else which one is not (one host sync)."""
    values = torch.stack([loss.detach().to(torch.float64), grad_norm.detach().to(torch.float64)]).tolist()
    bad = [f"{name} is {value}" for name, value in zip(("the loss", "the gradient norm"), values)
           if not math.isfinite(value)]
    return " and ".join(bad) or None


def _rank_entry(cfg: RunConfig, resume: bool | Path, progress: str = "auto", allow_reshape: bool = False) -> list[dict]:
    with StopSignal() as stop:
        return train(cfg, resume, stop, progress=progress, allow_reshape=allow_reshape)


def run(cfg: RunConfig, resume: bool | Path = False, progress: str = "auto", allow_reshape: bool = False) -> list[dict]:
    """Train under torchrun (``RANK`` set) or on ``dp * cp`` local gloo processes; returns rank 0's metrics.
    ``resume`` as :func:`train`'s; under torchrun a restarted worker resumes by itself (:func:`.resume.resume_from`).
    ``progress`` as :class:`Trainer`'s; the local ranks get it, and this process's logging settings;
    ``allow_reshape`` as :func:`train`'s."""
    # decided here: a rank's stdout is the fork server's, not necessarily this process's terminal
    progress = resolve_progress(progress)
    if "RANK" in os.environ:
        with StopSignal() as stop:   # (before the group exists: a signal while joining it is kept too)
            history = Trainer(cfg, resume=resume_from(Path(cfg.train.out), resume), stop=stop,
                              progress=progress, allow_reshape=allow_reshape).run()
        if stop.stopped_at is not None:
            raise Terminated(f"stopped by {stop.name}", [history], stop.signum)
        return history
    from ..distributed.spawn import run_distributed

    threads = max(1, (os.cpu_count() or 1) // cfg.world_size)
    return run_distributed(_rank_entry, cfg.world_size, cfg, resume, progress, allow_reshape, timeout=7 * 24 * 3600.0,
                           collective_timeout=cfg.parallel.timeout_s, threads_per_rank=threads)[0]
