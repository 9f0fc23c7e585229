"""``distattn bench``: real fwd+bwd runs of every scheduler across masks, lengths and world sizes.

For each world size one set of processes (gloo on CPU, nccl on GPUs) runs every
``(seq_len, mask, scheduler)`` case: ``warmup`` untimed rounds, then ``repeats``
timed ones; a round's time is the slowest rank's and the median round is kept.
Masks (document lengths from a real sample when given, else a log-normal stand-in):

* ``causal`` / ``full``: one document;
* ``causal-doc`` / ``full-doc``: packed documents;
* ``window``: one causal document with a sliding window of ``seq_len / 8``;
* ``shared-question`` / ``prefix-lm`` / ``causal-blockwise``: LongCA-bench's slice masks
  (:func:`distattn.doclens.mask_case`).

FLOPs follow the mask area: forward ``4 * area * Hq * D``, backward 2.5x that, so
``tflops = 3.5 * 4 * area * Hq * D / time``. ``flops_imbalance`` and ``send_bytes`` (forward,
per rank, max) come from the plan's ``stats()``. ``rank_comm_wait_ms`` is each rank's time held up by
its transfers in the median round, as the executor clocks it (``plan.comm_wait_seconds()``: host
time inside waits under gloo, the compute stream's stall on CUDA), ``comm_wait_ms`` the largest.
``cpu_others`` is how many cores other processes kept busy during the timed rounds (the machine's busy
time from ``/proc/stat`` less the ranks' own CPU time, over the wall time; NaN where there is no
``/proc/stat``): on a shared machine the bench has only the rest, and ``simulate --calibrate`` models
each row on what it had. ``peak_mem_mb`` is the largest rank's peak during the case: CUDA allocated
memory on GPUs; on CPU the process's peak resident set (reset before each case on Linux), which
includes the ~250 MB of the PyTorch runtime. When DeepSpeed is installed its
``DistributedAttention`` (Ulysses, with our local kernel inside) runs as ``deepspeed-ulysses`` on
the same inputs.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..api import attention, local_attention, plan
from ..cost import BWD_FLOPS_FACTOR, attention_flops
from ..doclens import MASK_CASES, mask_case
from ..schedulers import NAMES, PlanContext, spec
from ..timing import slowest_median, time_calls
from .results import COLUMNS
from .ulysses_vs_deepspeed import DEFAULT_EXTENSIONS_DIR

SCHEDULERS = NAMES
PEER_OF = {"deepspeed-ulysses": "ulysses"}   # another library's row -> our scheduler with its token split
MASKS = MASK_CASES
QUICK_MASKS = ("causal", "causal-doc", "window", "prefix-lm", "causal-blockwise")



@dataclass(frozen=True)
class BenchConfig:
    world_sizes: tuple[int, ...] = (1, 2, 4)
    seq_lens: tuple[int, ...] = (2048, 4096, 8192)
    masks: tuple[str, ...] = MASKS
    schedulers: tuple[str, ...] = SCHEDULERS
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 64
    dtype: str = "fp32"
    warmup: int = 1
    repeats: int = 3
    peers: bool = True
    doc_pool: tuple[int, ...] | None = field(default=None, repr=False)
    seed: int = 0

    @staticmethod
    def quick(**kw) -> "BenchConfig":
        """The quick suite's defaults (world sizes 2 and 4, 2K/4K tokens, 5 masks, 2 repeats); any of
        them given in ``kw`` wins."""
        return BenchConfig(**{"masks": QUICK_MASKS, "world_sizes": (2, 4), "seq_lens": (2048, 4096), "repeats": 2,
                              **kw})

    def check(self) -> None:
        for name in self.masks:
            if name not in MASKS:
                raise ValueError(f"--masks: {name!r} is unknown; choose from {', '.join(MASKS)}")
        for name in self.schedulers:
            if name not in SCHEDULERS:
                raise ValueError(f"--schedulers: {name!r} is unknown; choose from {', '.join(SCHEDULERS)}")
        if min(self.world_sizes) < 1 or min(self.seq_lens) < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("world sizes, sequence lengths and --repeats must be >= 1, --warmup >= 0")


def _reset_peak_mem(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mem_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak since start, KiB on Linux


def _deepspeed_attention(group, docs, causal, window):
    try:
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError:
        return None
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)

    def local(q, k, v):  # DeepSpeed's layout is [s, b, h, d]
        return local_attention(q[:, 0], k[:, 0], v[:, 0], docs, causal=causal, window=window)[:, None]
    return DistributedAttention(local, group, scatter_idx=2, gather_idx=0)


def _meshes(cfg: BenchConfig, world: int, device: torch.device, context: PlanContext) -> dict:
    """The group (or 2-D mesh) each scheduler plans on."""
    meshes = {name: dist.group.WORLD for name in cfg.schedulers}
    for name in cfg.schedulers:
        degree = spec(name).ulysses_axis(world, context)
        if degree > 1:
            # the one 2-D mesh (ParallelDims, through usp_mesh), made before any timed step: every
            # plan below finds its process groups instead of making them inside a measurement
            from ..mesh import usp_mesh

            meshes[name] = usp_mesh(device.type, degree)
    return meshes


def _step(name: str, p, q_l, k_l, v_l, d_l, case):
    """One forward and backward of ``name`` on this rank's shards (None: DeepSpeed is missing)."""
    if name == "deepspeed-ulysses":
        ds = _deepspeed_attention(dist.group.WORLD, case.docs, case.causal, case.window)
        if ds is None:
            return None

        def step():
            x = [t.detach()[:, None].requires_grad_() for t in (q_l, k_l, v_l)]
            ds(*x, 1).backward(d_l[:, None])
        return step

    def step():
        x = [t.detach().requires_grad_() for t in (q_l, k_l, v_l)]
        attention(*x, p).backward(d_l)
    return step


def _busy_seconds() -> float:
    """Seconds the machine's CPUs have been busy since boot, summed over them (``/proc/stat``; NaN
    without it)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _timed(cfg: BenchConfig, p, step, device: torch.device, world: int, clock: bool) -> tuple[float, float, list,
                                                                                                float]:
    """(slowest rank's median ms, peak MB over ranks, each rank's median comm wait ms: NaN unless ``clock``,
    the cores other processes kept busy over the timed rounds: ``cpu_others``)."""
    waits, usage = [], []

    def clocked(call=step):   # the executor's own clock of this rank's waits, per call; the CPU the call had
        before, busy, cpu, wall = p.comm_wait_seconds(), _busy_seconds(), time.process_time(), time.perf_counter()
        call()
        waits.append(p.comm_wait_seconds() - before)
        usage.append((_busy_seconds() - busy, time.process_time() - cpu, time.perf_counter() - wall))
    _reset_peak_mem(device)
    timing = time_calls(clocked, cfg.repeats, cfg.warmup, barrier=True, device=device)
    ms = slowest_median(timing.seconds, device=device) * 1e3
    mem = torch.tensor([_peak_mem_mb(device)], dtype=torch.float64, device=device)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    wait = torch.zeros(world, dtype=torch.float64, device=device)
    wait[dist.get_rank()] = statistics.median(waits[cfg.warmup:]) * 1e3 if clock else float("nan")
    dist.all_reduce(wait)
    # the machine's busy time (rank 0's reading) less every rank's own CPU time, per timed round
    busy, cpu, wall = (torch.tensor(x, dtype=torch.float64, device=device) for x in zip(*usage[cfg.warmup:]))
    dist.all_reduce(cpu)
    dist.broadcast(busy, 0)
    dist.broadcast(wall, 0)
    others = float(torch.clamp((busy - cpu) / wall, min=0).mean()) if device.type == "cpu" else float("nan")
    return ms, mem.item(), wait.tolist(), others


def _rank_main(cfg: BenchConfig, world: int, progress: bool) -> list[dict]:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    if cfg.peers and world > 1:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXTENSIONS_DIR)
    context = PlanContext(cfg.heads, cfg.kv_heads, head_dim=cfg.head_dim, dtype_bytes=dtype.itemsize)
    meshes = _meshes(cfg, world, device, context)
    rows = []
    for seq_len in cfg.seq_lens:
        for mask in cfg.masks:
            case = mask_case(mask, seq_len, cfg.doc_pool, cfg.seed)
            g = torch.Generator().manual_seed(cfg.seed)
            q, dout = (torch.randn(seq_len, cfg.heads, cfg.head_dim, generator=g).to(device, dtype) for _ in "qd")
            k, v = (torch.randn(seq_len, cfg.kv_heads, cfg.head_dim, generator=g).to(device, dtype) for _ in "kv")
            flops = (1 + BWD_FLOPS_FACTOR) * float(attention_flops(case.area(), cfg.heads, cfg.head_dim))
            names = list(cfg.schedulers) if world > 1 else ["local"]
            if cfg.peers and world > 1 and seq_len % world == 0 and cfg.kv_heads % world == 0 \
                    and case.slices is None:  # DeepSpeed's attention takes documents only
                names.append("deepspeed-ulysses")
            for name in names:
                ours = PEER_OF.get(name, name)   # DeepSpeed's row runs our ulysses plan's split
                if cfg.heads < spec(ours).head_split(world, context):   # a head for every rank
                    continue
                p = plan(case.docs, meshes.get(name, dist.group.WORLD), scheduler=ours, context=context,
                         **case.plan_kwargs())
                step = _step(name, p, *(p.shard(t) for t in (q, k, v, dout)), case)
                if step is None:
                    continue
                ms, mem, wait, others = _timed(cfg, p, step, device, world, name not in PEER_OF)
                st = p.stats(cfg.heads, cfg.kv_heads, cfg.head_dim, q.element_size())
                row = {"scheduler": name, "world_size": world, "seq_len": seq_len, "mask": mask, "fwd_bwd_ms": ms,
                       "tflops": flops / (ms * 1e-3) / 1e12, "flops_imbalance": st["flops_imbalance"],
                       "send_bytes": max(st["send_bytes"]), "peak_mem_mb": mem, "num_docs": len(case.docs),
                       "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
                       "device": device.type, "comm_wait_ms": max(wait),
                       "rank_comm_wait_ms": ";".join(f"{w:.3f}" for w in wait), "cpu_others": others}
                rows.append(row)
                if progress and dist.get_rank() == 0:
                    print(f"  world {world} seq {seq_len:>6} {mask:<10} {name:<17} {ms:>9.1f} ms "
                          f"{row['tflops'] * 1e3:>8.2f} GFLOP/s  imb {row['flops_imbalance']:.2f}", flush=True)
    return rows


def run_bench(cfg: BenchConfig, out: str | Path, progress: bool = True) -> list[dict]:
    """Run every case and write ``out/results.csv``, ``results.json``, plots and TensorBoard events."""
    from ..spawn import run_distributed

    cfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for world in cfg.world_sizes:
        if progress:
            print(f"world size {world}: {len(cfg.seq_lens)} lengths x {len(cfg.masks)} masks "
                  f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
        threads = max(1, (os.cpu_count() or 1) // world)
        rows += run_distributed(_rank_main, world, cfg, world, progress, timeout=3600.0, collective_timeout=600.0,
                                threads_per_rank=threads)[0]
    write_results(rows, out, cfg)
    if progress:
        print(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s -> {out}/results.csv", flush=True)
    return rows


def write_results(rows: list[dict], out: Path, cfg: BenchConfig) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    config = {k: v for k, v in asdict(cfg).items() if k != "doc_pool"}
    (out / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    from .plots import plot_results

    plot_results(rows, out)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    with SummaryWriter(str(out / "tb")) as tb:
        for r in rows:
            tag = f"{r['mask']}/w{r['world_size']}/{r['scheduler']}"
            tb.add_scalar(f"fwd_bwd_ms/{tag}", r["fwd_bwd_ms"], r["seq_len"])
            tb.add_scalar(f"tflops/{tag}", r["tflops"], r["seq_len"])
