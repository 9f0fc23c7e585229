"""``distattn bench``: real fwd+bwd runs of every scheduler across masks, lengths and world sizes.

For each world size one set of processes (gloo on CPU, nccl on GPUs) runs every
``(seq_len, mask, scheduler)`` case: ``warmup`` untimed rounds, then ``repeats``
timed ones; a round's time is the slowest rank's and the median round is kept.
Masks (document lengths from a real sample when given, else a log-normal stand-in):

* ``causal`` / ``full``: one document;
* ``causal-doc`` / ``full-doc``: packed documents;
* ``window``: one causal document with a sliding window of ``seq_len / 8``;
* ``shared-question`` / ``prefix-lm`` / ``causal-blockwise``: LongCA-bench's slice masks
  (:func:`distattn.planning.doclens.mask_case`).

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
import logging
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..runtime.api import attention, local_attention, plan
from ..costmodel.cost import BWD_FLOPS_FACTOR, Roofline, attention_flops
from ..planning.doclens import MASK_CASES, mask_case
from ..kernels.speed import device_gpu
from ..schedulers import NAMES, PlanContext, spec
from ..distributed.timing import slowest_median, time_calls
from .results import COLUMNS
from .ulysses_vs_deepspeed import DEFAULT_EXTENSIONS_DIR, deepspeed_attention_class

SCHEDULERS = NAMES
PEER_OF = {"deepspeed-ulysses": "ulysses"}   # another library's row -> our scheduler with its token split
MASKS = MASK_CASES
QUICK_MASKS = ("causal", "causal-doc", "window", "prefix-lm", "causal-blockwise")
DEEPSPEED_BUILD_S = 200   # DeepSpeed's one-time CPU op build on 2 cores, as issue 79 saw it
DEEPSPEED_CPU_OP = "deepspeed_shm_comm"   # the folder the build leaves in the extensions cache
_log = logging.getLogger(__name__)


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
        """The quick suite's defaults (world sizes 2 and 4, 2K/4K tokens, 5 masks, 2 repeats, no DeepSpeed
        row); any of them given in ``kw`` wins. DeepSpeed is left out because on a CPU machine its first run
        compiles a C++ communication op (about 200 s on 2 cores, :data:`DEEPSPEED_BUILD_S`): most of a
        quick run's minutes, spent on another library's row."""
        return BenchConfig(**{"masks": QUICK_MASKS, "world_sizes": (2, 4), "seq_lens": (2048, 4096), "repeats": 2,
                              "peers": False, **kw})

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
    DistributedAttention = deepspeed_attention_class(dist.get_backend())
    if DistributedAttention is None:
        return None

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
            from ..distributed.mesh import usp_mesh

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


def _dtype(cfg: BenchConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]


def _context(cfg: BenchConfig, device: torch.device | None = None) -> PlanContext:
    """The bench's job as the planners see it, on ``device``'s GPU (cad balances its kernel's seconds)."""
    return PlanContext(cfg.heads, cfg.kv_heads, head_dim=cfg.head_dim, dtype_bytes=_dtype(cfg).itemsize,
                       gpu=None if device is None else device_gpu(device))


def _cpu_cost(cfg: BenchConfig, name: str, device: torch.device) -> dict:
    """On a CPU, a planner that takes a cost model (cad) balances the pairs themselves (a roofline: the
    CPU kernel has no CTAs to fill)."""
    if device.type != "cpu":
        return {}
    return spec(name).taken({"cost": Roofline(num_heads=cfg.heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                                              dtype_bytes=_dtype(cfg).itemsize)})


@dataclass(frozen=True)
class Case:
    """One timed run: ``name`` on ``world`` ranks over ``seq_len`` tokens of ``mask``. ``weight``: the
    proxy for its cost that the ETA spreads the elapsed time by (:func:`_weight`)."""
    world: int
    seq_len: int
    mask: str
    name: str
    weight: float

    def label(self) -> str:
        tokens = f"{self.seq_len // 1024}K" if self.seq_len % 1024 == 0 else str(self.seq_len)
        return f"{self.name}, {self.mask}, {self.world} rank{'s' if self.world > 1 else ''}, {tokens}"


def _weight(area: float, seq_len: int) -> float:
    """The mask's area (the attention FLOPs) plus ``TOKEN_AREA`` per token for what does not grow with it
    (planning, per-document kernel calls, transfers). Fitted to a 2-core CPU's ``--quick``: the ETA was
    off by 8% of the run's length on average over its first quarter (the area alone: 29%, one per case: 41%).
    The ranks are not in it: the ranks share the machine's cores, so 4 cost about what 2 do."""
    return area + TOKEN_AREA * seq_len


TOKEN_AREA = 512


def bench_cases(cfg: BenchConfig) -> list[Case]:
    """Every run of the suite in the order the ranks run them: the progress display's total is known
    before the first rank starts, and the ranks run this list rather than a loop of their own."""
    context, masks, cases = _context(cfg), {}, []
    for world in cfg.world_sizes:
        for seq_len in cfg.seq_lens:
            for mask in cfg.masks:
                if (seq_len, mask) not in masks:
                    masks[seq_len, mask] = mask_case(mask, seq_len, cfg.doc_pool, cfg.seed)
                mc = masks[seq_len, mask]
                names = list(cfg.schedulers) if world > 1 else ["local"]
                if cfg.peers and world > 1 and seq_len % world == 0 and cfg.kv_heads % world == 0 \
                        and mc.slices is None:  # DeepSpeed's attention takes documents only
                    names.append("deepspeed-ulysses")
                # a head for every rank (DeepSpeed's row runs our ulysses plan's split)
                cases += [Case(world, seq_len, mask, name, _weight(float(mc.area()), seq_len)) for name in names
                          if cfg.heads >= spec(PEER_OF.get(name, name)).head_split(world, context)]
    return cases


def _result_line(row: dict) -> str:
    return (f"{row['fwd_bwd_ms']:.1f} ms, {row['tflops'] * 1e3:.2f} GFLOP/s, imb {row['flops_imbalance']:.2f}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class BenchProgress:
    """The bench's display over :func:`bench_cases`: a tqdm bar (``bar``; the running case beside it),
    else ``say`` gets a line per finished case with its time and an ETA. The ETA spreads the time so
    far over the finished cases' weights (:func:`_weight`): a 4K causal run costs 3-4x a 2K one on CPU, so a
    mean per case would promise too little while the short lengths run first."""

    def __init__(self, cases: list[Case], bar: bool, say: Callable[[str], None] | None = print,
                 file=None, clock: Callable[[], float] = time.perf_counter):
        self.cases, self.say, self.clock = list(cases), say, clock
        self.start, self.count, self.total = clock(), 0, len(self.cases)
        self.weight_done, self.weight_total, self.seconds_done = 0.0, sum(c.weight for c in self.cases), 0.0
        # the first DeepSpeed case's weight: its seconds hold DeepSpeed's import and one-time build, not
        # the case's cost, so the ETA leaves both out (they once promised 1 h 27 min for a 10-minute run)
        self.weight_unclocked, self._peer_seen = 0.0, False
        self.bar = None
        if bar:
            from tqdm import tqdm

            # n and total are weights so tqdm's ETA is the weighted one; the case count is in the text.
            # smoothing=0: the mean rate since the start, not the last few (uneven) cases'
            self.bar = tqdm(total=self.weight_total, smoothing=0, dynamic_ncols=True, file=file or sys.stdout,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
            self._show()

    def _show(self) -> None:
        running = self.cases[self.count].label() if self.count < self.total else "done"
        self.bar.set_description_str(f"bench {self.count}/{self.total}", refresh=False)
        self.bar.set_postfix_str(running, refresh=True)

    def eta(self) -> float | None:
        """Seconds left: the finished cases' own seconds per unit of their weight times the weight left.
        Their seconds, not the wall clock's: the ranks' start (torch, DeepSpeed's build) would all land on
        the first case and promise an hour at case 1."""
        if self.weight_done <= 0:
            return None
        return self.seconds_done / self.weight_done * (self.weight_total - self.weight_done - self.weight_unclocked)

    def note(self, text: str) -> None:
        """A line that is not a case's (a world size starting): above the bar, or through ``say``."""
        if self.bar is not None:
            self.bar.write(text, file=self.bar.fp)
        elif self.say is not None:
            self.say(text)

    def done(self, index: int, seconds: float, row: dict | None) -> None:
        """Case ``index`` of the list finished after ``seconds``; ``row`` None: it could not run
        (DeepSpeed failed to import) and leaves the total."""
        case = self.cases[index]
        if row is None:
            self.total -= 1
            self.weight_total -= case.weight
        else:
            self.count += 1
            if case.name in PEER_OF and not self._peer_seen:
                self._peer_seen = True
                self.weight_unclocked += case.weight
            else:
                self.weight_done += case.weight
                self.seconds_done += seconds
        if self.bar is not None:
            self.bar.total = self.weight_total
            if row is not None:
                self.bar.write(f"  {case.label()}: {_result_line(row)} ({seconds:.1f} s)", file=self.bar.fp)
                self.bar.update(case.weight)
            self._show()
        elif self.say is not None:
            eta = self.eta()
            if row is None:
                self.say(f"bench: {case.label()} skipped (DeepSpeed does not import); {self.total} cases")
            else:
                self.say(f"bench: case {self.count}/{self.total} ({case.label()}) {seconds:.1f} s: "
                         f"{_result_line(row)}; ETA {'?' if eta is None else _duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rank_main(cfg: BenchConfig, world: int, cases: list[tuple[int, Case]], events) -> list[dict]:
    """Run ``cases`` (their indices in :func:`bench_cases`) on this world; rank 0 puts ``(index, seconds,
    row or None)`` on ``events`` (a queue, or None) as each finishes, for the caller's display."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = _dtype(cfg)
    if cfg.peers and world > 1:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXTENSIONS_DIR)
    context = _context(cfg, device)
    meshes = _meshes(cfg, world, device, context)
    rows, key, report = [], None, events is not None and dist.get_rank() == 0
    for index, c in cases:
        start = time.perf_counter()
        if (c.seq_len, c.mask) != key:   # the inputs are made once per (length, mask), as the cases come
            key, seq_len = (c.seq_len, c.mask), c.seq_len
            case = mask_case(c.mask, seq_len, cfg.doc_pool, cfg.seed)
            g = torch.Generator().manual_seed(cfg.seed)
            q, dout = (torch.randn(seq_len, cfg.heads, cfg.head_dim, generator=g).to(device, dtype) for _ in "qd")
            k, v = (torch.randn(seq_len, cfg.kv_heads, cfg.head_dim, generator=g).to(device, dtype) for _ in "kv")
            flops = (1 + BWD_FLOPS_FACTOR) * float(attention_flops(case.area(), cfg.heads, cfg.head_dim))
        name = c.name
        ours = PEER_OF.get(name, name)   # DeepSpeed's row runs our ulysses plan's split
        p = plan(case.docs, meshes.get(name, dist.group.WORLD), scheduler=ours, context=context,
                 **case.plan_kwargs(), **_cpu_cost(cfg, ours, device))
        step = _step(name, p, *(p.shard(t) for t in (q, k, v, dout)), case)
        if step is None:
            if report:
                events.put((index, time.perf_counter() - start, None))
            continue
        ms, mem, wait, others = _timed(cfg, p, step, device, world, name not in PEER_OF)
        st = p.stats(cfg.heads, cfg.kv_heads, cfg.head_dim, q.element_size())
        row = {"scheduler": name, "world_size": world, "seq_len": seq_len, "mask": c.mask, "fwd_bwd_ms": ms,
               "tflops": flops / (ms * 1e-3) / 1e12, "flops_imbalance": st["flops_imbalance"],
               "send_bytes": max(st["send_bytes"]), "peak_mem_mb": mem, "num_docs": len(case.docs),
               "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
               "device": device.type, "comm_wait_ms": max(wait),
               "rank_comm_wait_ms": ";".join(f"{w:.3f}" for w in wait), "cpu_others": others,
               "cad_backward": getattr(p.schedule, "backward", None)}
        rows.append(row)
        if report:
            events.put((index, time.perf_counter() - start, row))
    return rows


def _listen(events, show: BenchProgress) -> threading.Thread:
    """A thread that passes rank 0's events to ``show`` while :func:`run_distributed` waits for the
    ranks (it blocks this one); a None event ends it."""
    def loop():
        while (event := events.get()) is not None:
            try:
                show.done(*event)
            except Exception:   # a display error must not stop the draining: a full pipe would stall rank 0
                _log.exception("bench: the progress display failed")
    thread = threading.Thread(target=loop, name="distattn-bench-progress", daemon=True)
    thread.start()
    return thread


def run_bench(cfg: BenchConfig, out: str | Path, progress: bool = True, bar: bool | None = None) -> list[dict]:
    """Run every case and write ``out/results.csv``, ``results.json``, plots and TensorBoard events.
    ``progress``: show the cases as they finish -- a tqdm bar on a terminal while the ``distattn``
    logger shows INFO (``bar`` forces it on or off), else a line per case logged at INFO."""
    from ..distributed.spawn import _context as spawn_context, run_distributed
    from ..train.metrics import resolve_progress

    cfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = bench_cases(cfg)
    show, events, listener = None, None, None
    if progress:
        # the trainer's decision (terminal and log level) rather than a copy of it
        bar = resolve_progress("auto") == "bar" if bar is None else bar
        show = BenchProgress(cases, bar, say=_log.info)
        # rank 0 reports each case as it ends; a SimpleQueue writes through at put, so nothing is left
        # in a feeder thread when run_distributed ends the ranks
        events = spawn_context().SimpleQueue()
    rows, t0 = [], time.perf_counter()
    if show is not None and any(c.name in PEER_OF for c in cases):
        show.note(deepspeed_build_note())
    try:
        for world in cfg.world_sizes:
            mine = [(i, c) for i, c in enumerate(cases) if c.world == world]
            if show is not None:
                show.note(f"world size {world}: {len(mine)} cases ({len(cfg.seq_lens)} lengths x "
                          f"{len(cfg.masks)} masks; {time.perf_counter() - t0:.0f} s so far)")
                listener = _listen(events, show)
            threads = max(1, (os.cpu_count() or 1) // world)
            rows += run_distributed(_rank_main, world, cfg, world, mine, events, timeout=3600.0,
                                    collective_timeout=600.0, threads_per_rank=threads)[0]
            if listener is not None:   # every event of this world is in the pipe: let the thread show them
                events.put(None)
                listener.join()
                listener = None
    finally:
        if listener is not None:   # a rank failed: stop the thread (the error is run_distributed's)
            events.put(None)
            listener.join(timeout=5)
        if show is not None:
            show.close()
    write_results(rows, out, cfg)
    if show is not None:
        show.note(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s -> {out / 'results.csv'}")
    return rows


def deepspeed_build_note(extensions_dir: str | None = None) -> str:
    """What the DeepSpeed row costs before it runs: on a CPU machine without DeepSpeed's op in the
    extensions cache, a one-time C++ build (said before it starts, so a quiet ~3 minutes is not a hang)."""
    folder = Path(extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR") or DEFAULT_EXTENSIONS_DIR)
    if torch.cuda.is_available() or any(folder.glob(f"**/{DEEPSPEED_CPU_OP}*")):
        return f"DeepSpeed's row (deepspeed-ulysses) reuses its built ops in {folder}"
    return (f"DeepSpeed's row (deepspeed-ulysses): its first case compiles DeepSpeed's CPU communication op "
            f"once (about {DEEPSPEED_BUILD_S // 60} min on 2 cores, left out of the ETA) into {folder}; later "
            f"runs reuse it (--no-peers skips DeepSpeed)")


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
