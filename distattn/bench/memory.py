"""The longest sequence that trains under a per-rank memory budget, per scheduler and setting, measured.

    python -m distattn.bench.memory [--budget-gib 0.8] [--schedulers zigzag ring ulysses cad]
                                          [--settings fp32:none fp32:full] [--cp 2] [--config configs/tiny.yaml]
    python -m distattn.bench.memory --saved [--world-size 8]   # attention's saved bytes per layer (.saved)

For each scheduler and setting (``train.dtype`` : ``train.activation_checkpointing``) this runs
real training steps of the config's model (default: ``configs/tiny.yaml``'s, on ``--cp`` ranks, one
replica) through ``distattn.train.trainer`` and reads the trainer's ``peak_memory_gib`` metric: the
largest peak over the ranks, on CPU each rank process's peak resident set (``ru_maxrss``), on a GPU
``torch.cuda.max_memory_allocated``. Every run starts new rank processes, so each peak belongs to
that run alone.

Search: the peak at two short lengths (``--fit-lens``) gives a line, fixed + bytes per token;
its longest length under the budget is measured (the verification run); a length over the budget
is refitted through the newest points and tried shorter, up to ``--tries`` times. The table gives
the longest measured length under the budget, the line's prediction, the peak there, the measured
bytes per token and fixed part, and ``distattn.train.preflight.memory.estimate`` for the same run (CPU:
the total with a CPU rank's runtime; GPU: without the runtime constant, which the allocator's
peak does not see).

Data: a synthetic token file of documents of ``--doc-len`` random tokens (written to a temporary
folder), so every step's attention grows linearly with the length, whatever the length; the
estimate is given the same document lengths.

On a CPU without bf16 matrix units (no AVX512-BF16/AMX), bf16 matmuls run ~25x slower than fp32:
the default settings on CPU are fp32 only (ask for ``bf16:none bf16:full`` with ``--settings``);
with a GPU all four. With defaults on two CPU cores: about 1.5-3 minutes per scheduler (up to 4
runs of 2 steps per setting).
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..schedulers import NAMES
from ..distributed.spawn import RankError, run_distributed
from . import saved
from ..train.config import CHECKPOINTING, DTYPES, RunConfig, load_config, validate
from ..train.data.corpus import write_token_file
from ..train.preflight.memory import GIB, estimate
from ..train.trainer import run, train

DEFAULT_SCHEDULERS = ("zigzag", "ring", "ulysses", "cad")
CPU_SETTINGS = ("fp32:none", "fp32:full")
GPU_SETTINGS = ("fp32:none", "fp32:full", "bf16:none", "bf16:full")
MULTIPLE = 256          # lengths tried are multiples of this


@dataclass(frozen=True)
class Result:
    scheduler: str
    dtype: str
    checkpointing: str
    seq_len: int                 # longest measured length under the budget (0: none fits)
    predicted: int               # the fitted line's longest length under the budget
    peak_gib: float              # measured peak at seq_len
    bytes_per_token: float       # measured: slope of the line through the fit points
    fixed_gib: float             # measured: the line at zero tokens
    estimate_gib: float          # distattn.train.preflight.memory.estimate at seq_len (comparable to peak_gib)
    estimate_bytes_per_token: float
    runs: int                    # training runs the search made


def parse_setting(text: str) -> tuple[str, str]:
    """``"bf16:full"`` -> ``("bf16", "full")``; ``ValueError`` naming ``--settings`` otherwise."""
    dtype, _, mode = text.partition(":")
    if dtype not in DTYPES or mode not in CHECKPOINTING:
        raise ValueError(f"--settings: {text!r} is not DTYPE:CHECKPOINTING with DTYPE in {', '.join(DTYPES)} and "
                         f"CHECKPOINTING in {', '.join(CHECKPOINTING)} (e.g. fp32:none)")
    return dtype, mode


def doc_lens(seq_len: int, doc_len: int) -> list[int]:
    """The first packed sequence of documents of ``doc_len`` tokens (what the estimate is given)."""
    return [doc_len] * (seq_len // doc_len) + ([seq_len % doc_len] if seq_len % doc_len else [])


def write_corpus(prefix: Path, vocab_size: int, doc_len: int, docs: int = 64, seed: int = 0) -> None:
    """``docs`` documents of ``doc_len`` random tokens as ``PREFIX.bin`` + ``PREFIX.idx.npy`` (the packer
    wraps around, so any length trains on them)."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    write_token_file(prefix, [rng.integers(0, vocab_size, doc_len) for _ in range(docs)], dtype=dtype)


def run_config(base: RunConfig, scheduler: str, setting: tuple[str, str], seq_len: int, data: Path, out: Path,
               steps: int) -> RunConfig:
    """``base`` as one measurement: one replica, ``seq_len`` tokens of the synthetic corpus, no checkpoint
    until the last step (the trainer saves one there, after the peak is read)."""
    dtype, mode = setting
    return validate(base.replace(
        parallel={"dp": 1, "scheduler": scheduler, "ulysses_degree": None},
        data={"source": "tokens", "path": str(data), "seq_len": seq_len, "seed": 0},
        train={"steps": steps, "dtype": dtype, "activation_checkpointing": mode, "out": str(out),
               "log_every": steps, "ckpt_every": steps, "warmup_steps": 0}))


def _gpu_rank(cfg: RunConfig) -> list[dict]:
    # the trainer puts each rank on cuda:LOCAL_RANK, which a torchrun sets; here one process per GPU
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    return train(cfg)


def measure(cfg: RunConfig, device: str) -> float | None:
    """The run's peak memory in GiB (the largest over ranks and steps), or None when it failed (out of
    memory: a killed rank, a CUDA OOM)."""
    try:
        if device == "cuda":
            history = run_distributed(_gpu_rank, cfg.world_size, cfg, backend="nccl", timeout=3600.0,
                                      collective_timeout=cfg.parallel.timeout_s)[0]
        else:
            history = run(cfg)
    except RankError as exc:
        print(f"    seq_len {cfg.data.seq_len}: failed ({str(exc).splitlines()[0][:120]})", flush=True)
        return None
    finally:   # the trainer checkpoints its last step: keep the disk free for the next run
        shutil.rmtree(cfg.train.out, ignore_errors=True)
    return max(m["peak_memory_gib"] for m in history)


# the estimate's components that hold the model (per parallel.dp_mode) and those that grow with the tokens
STATES = ("weights", "grads", "optimizer")
TOKEN_PARTS = ("activations", "loss", "attention_buffers", "inputs")


def backward_peaks(cfgs: dict[str, RunConfig], steps: int = 2) -> dict[str, int]:
    """Inside a gloo rank: each run of ``cfgs`` set up and stepped ``steps`` times (no checkpoint, no
    log) under :class:`.memtrack.TensorMemory`, and its live tensor bytes' peak over the last step from
    its start to its backward's return -- the moment the estimate's sum bounds (its components are at
    backward's peak; the optimizer step's temporaries, and the clip's, come after it and are not
    counted). Two steps: AdamW makes its moments in the first."""
    from .memtrack import TensorMemory
    from ..train.trainer import Trainer

    out = {}
    for name, cfg in cfgs.items():
        peaks = []
        with TensorMemory("cpu") as mem:
            plain = torch.Tensor.backward

            def backward(self, *args, **kwargs):
                plain(self, *args, **kwargs)
                peaks.append(mem.peak)
            torch.Tensor.backward = backward
            trainer = Trainer(cfg)
            try:
                trainer.setup()
                for _ in range(steps):
                    gc.collect()   # (garbage of the step before is no part of this one's peak)
                    mem.reset_peak()
                    trainer.step()
            finally:
                torch.Tensor.backward = plain
                trainer.close()
        out[name] = peaks[-1]
    return out


def states_measured(cfg: RunConfig, peak: int) -> tuple[int, int]:
    """(the measured parameter states of a run of ``cfg`` -- its :func:`backward_peaks` peak less the
    estimate's token-proportional parts, small in a run whose states dominate --, the estimate's
    weights + grads + optimizer), bytes per rank."""
    est = estimate(cfg, "cpu")
    return peak - sum(getattr(est, name) for name in TOKEN_PARTS), sum(getattr(est, name) for name in STATES)


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed GiB, GiB per token) of the line through the two longest measured points."""
    (l0, p0), (l1, p1) = sorted(points)[-2:]
    slope = (p1 - p0) / (l1 - l0) if l1 != l0 else 0.0
    return p0 - slope * l0, slope


def _longest_under(fixed: float, slope: float, budget: float, cap: int) -> int:
    if slope <= 0:
        return cap
    return max(0, min(cap, int((budget - fixed) / slope) // MULTIPLE * MULTIPLE))


def _next_length(points, over, budget: float, cap: int) -> int:
    """The next length to try: between the longest length under the budget and the shortest over it
    (the secant through both; the midpoint when that run crashed), else the line through the two
    longest lengths under it."""
    n0, p0 = max(points)
    if over:
        n1, p1 = min(over)
        guess = n0 + (budget - p0) * (n1 - n0) / (p1 - p0) if p1 is not None and p1 > p0 else (n0 + n1) / 2
        return min(int(guess) // MULTIPLE * MULTIPLE, n1 - MULTIPLE)
    return _longest_under(*_fit(points), budget, cap)


def search(measure_at, budget: float, fit_lens: tuple[int, int], cap: int, tries: int, say=print) -> dict:
    """The longest length ``measure_at(seq_len) -> GiB | None`` keeps under ``budget`` (see module
    docstring); returns the points under the budget, the fit, its prediction, the answer and the runs."""
    points, over = [], []     # (length, peak) under the budget; over it or crashed (peak None)

    def run_at(n: int, note: str = "") -> None:
        peak = measure_at(n)
        say(f"    seq_len {n:>7}: {'failed' if peak is None else f'{peak:.3f} GiB'}{note}")
        (points if peak is not None and peak <= budget else over).append((n, peak))

    for n in fit_lens:
        run_at(n)
        if over:
            break
    if len(points) < 2:
        return {"points": points, "fixed": float("nan"), "slope": float("nan"), "predicted": 0,
                "best": max(points, default=(0, float("nan"))), "runs": len(points) + len(over)}
    fixed, slope = _fit(points)
    predicted = _longest_under(fixed, slope, budget, cap)
    target = predicted
    for _ in range(tries):
        if target <= max(points)[0]:
            break
        run_at(target, " (predicted longest)" if target == predicted else "")
        target = _next_length(points, over, budget, cap)
    return {"points": points, "fixed": fixed, "slope": slope, "predicted": predicted, "best": max(points),
            "runs": len(points) + len(over)}


def bench_one(base: RunConfig, scheduler: str, setting: tuple[str, str], args, device: str, tmp: Path) -> Result:
    label = f"{scheduler}-{setting[0]}-{setting[1]}"

    def cfg_at(n: int) -> RunConfig:   # one output folder per run (a length is measured once)
        return run_config(base, scheduler, setting, n, tmp / "corpus", tmp / f"{label}-{n}", args.steps)

    found = search(lambda n: measure(cfg_at(n), device), args.budget_gib, tuple(args.fit_lens), args.max_seq_len,
                   args.tries, say=lambda line: print(line, flush=True))
    seq, peak = found["best"]

    def est_at(n: int) -> int:
        # the allocator's peak on a GPU does not see the CUDA context: compare without the runtime
        e = estimate(cfg_at(n), device, doc_lens(n, args.doc_len))
        return e.total - (e.runtime if device == "cuda" else 0)

    est = est_at(seq) / GIB if seq else float("nan")
    lo, hi = args.fit_lens[0], max(seq, args.fit_lens[1])
    est_slope = (est_at(hi) - est_at(lo)) / (hi - lo)
    return Result(scheduler, setting[0], setting[1], seq, found["predicted"], peak, found["slope"] * GIB,
                  found["fixed"], est, est_slope, found["runs"])


def print_table(results: list[Result], budget: float, device: str) -> None:
    print(f"\nlongest sequence under {budget:g} GiB per rank ({device}; peak = max over ranks of "
          f"{'ru_maxrss' if device == 'cpu' else 'max_memory_allocated'}):")
    print(f"{'scheduler':<10} {'dtype':<5} {'ckpt':<9} {'seq_len':>8} {'predicted':>9} {'peak GiB':>9} "
          f"{'B/token':>8} {'fixed GiB':>9} {'est GiB':>8} {'est B/tok':>9} {'est/peak':>8}")
    for r in results:
        ratio = r.estimate_gib / r.peak_gib if r.seq_len else float("nan")
        print(f"{r.scheduler:<10} {r.dtype:<5} {r.checkpointing:<9} {r.seq_len:>8} {r.predicted:>9} "
              f"{r.peak_gib:>9.3f} {r.bytes_per_token:>8,.0f} {r.fixed_gib:>9.3f} {r.estimate_gib:>8.3f} "
              f"{r.estimate_bytes_per_token:>9,.0f} {ratio:>8.2f}")


def trainer_bench_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark that runs the trainer takes: ``--config`` (its model and
    dp_mode) and ``--cp`` (context-parallel ranks of the one replica)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="run config whose model and dp_mode are used")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks (one replica)")
    return parser


def check_positive(args: argparse.Namespace, names) -> None:
    """``ValueError`` naming the flag unless each of ``names`` is at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _parser() -> argparse.ArgumentParser:
    parser = trainer_bench_parser("python -m distattn.bench.memory", __doc__)
    parser.add_argument("--schedulers", nargs="+", default=list(DEFAULT_SCHEDULERS), choices=NAMES)
    parser.add_argument("--settings", nargs="+", default=None,
                        help=f"DTYPE:CHECKPOINTING pairs (default: {' '.join(CPU_SETTINGS)} on CPU, "
                             f"{' '.join(GPU_SETTINGS)} on a GPU)")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="per-rank memory budget in GiB (default: 0.8 on CPU, the GPU's memory on a GPU)")
    parser.add_argument("--fit-lens", type=int, nargs=2, default=[1024, 4096], metavar=("SHORT", "LONG"),
                        help="the two lengths the line is fitted through")
    parser.add_argument("--max-seq-len", type=int, default=262144, help="longest length tried")
    parser.add_argument("--tries", type=int, default=2, help="verification runs at most per scheduler and setting")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (the peak of the last counts "
                        "AdamW's state)")
    parser.add_argument("--doc-len", type=int, default=2048, help="tokens per synthetic document")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when a GPU is available")
    saved.add_arguments(parser)
    return parser


def _checked(args) -> tuple[str, list[tuple[str, str]]]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is available here")
    check_positive(args, ("cp", "max_seq_len", "tries", "steps", "doc_len"))
    if not 0 < args.fit_lens[0] < args.fit_lens[1] <= args.max_seq_len:
        raise ValueError(f"--fit-lens must be two increasing lengths up to --max-seq-len, got {args.fit_lens}")
    if device == "cuda" and args.cp > torch.cuda.device_count():
        raise ValueError(f"--cp {args.cp} needs {args.cp} GPUs; this machine has {torch.cuda.device_count()}")
    if args.budget_gib is None:
        args.budget_gib = torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else 0.8
    if args.budget_gib <= 0:
        raise ValueError(f"--budget-gib must be > 0, got {args.budget_gib}")
    settings = [parse_setting(s) for s in (args.settings or (GPU_SETTINGS if device == "cuda" else CPU_SETTINGS))]
    return device, settings


def run_bench(args: argparse.Namespace) -> tuple[list[Result], str]:
    """Every scheduler and setting of parsed ``args`` (see :func:`_parser`): (results, device)."""
    device, settings = _checked(args)
    base = load_config(args.config).replace(parallel={"cp": args.cp})
    print(f"distattn.bench.memory: {args.config} model, cp {args.cp}, {device}, budget {args.budget_gib:g} "
          f"GiB per rank, {len(args.schedulers)} scheduler(s) x {len(settings)} setting(s), {args.steps} steps a run",
          flush=True)
    results, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distattn-bench-memory-") as tmp:
        write_corpus(Path(tmp) / "corpus", base.model.vocab_size, args.doc_len)
        for scheduler in args.schedulers:
            for setting in settings:
                print(f"[{time.perf_counter() - start:6.0f} s] {scheduler} {setting[0]} {setting[1]}", flush=True)
                results.append(bench_one(base, scheduler, setting, args, device, Path(tmp)))
    return results, device


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    if args.saved:
        saved.run(args)
        print(f"({math.ceil(time.perf_counter() - start)} s)")
        return 0
    results, device = run_bench(args)
    print_table(results, args.budget_gib, device)
    print(f"({math.ceil(time.perf_counter() - start)} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
