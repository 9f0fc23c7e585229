"""What a pretraining team reads per step: MFU, throughput, memory, balance, communication.

:meth:`ModelShape.model_flops <distattn.costmodel.model_shape.ModelShape.model_flops>` counts the FLOPs the
model needs per step, not what the hardware executes: ``6 * N`` per token for the matmul parameters (the output
projection included, the embedding lookup not) plus three times the forward
attention FLOPs over the documents' real mask area (causal, per document:
``4 * visible pairs * heads * head_dim`` per layer). Recomputation by
activation checkpointing is not counted, as in PaLM's definition of MFU.
MFU divides that by the step time and the devices' dense bf16 peak
(:func:`device_peak_flops`); on CPU there is no meaningful peak: ``None``,
printed ``n/a``.

:class:`RunLog` is rank 0's output: ``metrics.jsonl`` (one JSON object per
logged step), TensorBoard scalars under ``tb/`` (without the ``viz`` extra's TensorBoard: one
warning, and no events) and the progress a :class:`~distattn.train.trainer.Trainer`'s ``progress``
chooses (:func:`progress_display`): a tqdm bar, one plain line per logged step (a log file, Slurm's
output), log records or nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ..costmodel.model_shape import gpu_named
from .safe_io import WriteFailed, open_append, read_regular, replace_text

_log = logging.getLogger(__name__)

#: a Trainer's ``progress`` values (:func:`resolve_progress`)
PROGRESS = ("auto", "bar", "line", "log", "none")

#: the metrics a step logs that depend on the machine's speed and load, not on the training: a resumed
#: run's other metrics equal an uninterrupted run's
TIMINGS = frozenset({"tokens_per_s", "tokens_per_s_per_device", "step_time_s", "mfu", "peak_memory_gib",
                     "comm_wait_s", "planning_s", "plan_made_s",
                     # parallel.cp/scheduler: auto runs the fixed choice when its own is late (.auto_plan)
                     "choice", "choice_late", "predicted_step_s", "model_step_s"})


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Dense bf16 FLOP/s of ``device``: ``override_tflops`` (``train.peak_tflops``) if given, else
    looked up by the GPU's name (:data:`distattn.costmodel.model_shape.GPU_TABLE`); None on CPU or for a GPU
    the table does not know."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    gpu = gpu_named(torch.cuda.get_device_name(device))
    return None if gpu is None else gpu.peak_tflops * 1e12


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank since it started: the CUDA caching allocator's peak on a GPU, the
    process's peak resident set on CPU (Linux reports kilobytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fmt_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


METRICS_LIMIT = 1 << 32   # bytes of metrics.jsonl a resume reads (about 8M logged steps)


def strict_row(m: dict) -> str:
    """One ``metrics.jsonl`` line: strict JSON, a non-finite number written as ``null``."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()},
                      allow_nan=False)


def logged_rows(path: Path, done: int | None = None, say=None) -> list[str]:
    """The lines of ``metrics.jsonl`` a resume from step ``done`` keeps, made the file's content.

    A last line left half-written by a crash is dropped (``say`` tells), and with ``done`` so are rows
    of later steps (they are trained again). The file is rewritten only if that changed anything, and
    atomically, so a failure (a full disk) leaves it as it was. ``ValueError`` for a damaged line before
    the last, a link, a FIFO or a file that cannot be rewritten."""
    if path.is_symlink():
        raise ValueError(f"{path} is a link to {os.readlink(path)}; a run writes its metrics into a file of its "
                         f"own: remove the link")
    try:
        lines = read_regular(path, METRICS_LIMIT, "metrics").decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    kept, torn = [], None
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and type(row.get("step")) is int):
                raise ValueError("no step number")
        except ValueError as exc:   # JSONDecodeError too
            if i + 1 < len(lines):
                raise ValueError(f"{path} line {i + 1} is damaged ({exc}); delete that line (or the file) "
                                 f"to resume") from None
            torn = line
            continue
        if done is None or row["step"] <= done:
            kept.append(line)
    if len(kept) == len(lines):
        return kept
    try:
        replace_text(path, "".join(line + "\n" for line in kept))
    except OSError as exc:
        raise ValueError(f"{path} could not be rewritten ({exc.strerror}); it is unchanged: free space or fix "
                         f"the folder's permissions, then resume again") from None
    if torn is not None and say is not None:
        say(f"{path}: dropped its last line, left half-written by the run that stopped ({len(torn)} characters)")
    return kept


def _quiet_tensorboard_thread() -> None:
    """Keep the TensorBoard writer thread's ``OSError`` (a full disk) off stderr: the thread stores it
    and raises it again in the next call from this process, which :class:`RunLog` turns into one
    ``WriteFailed`` line. Every other thread's exception still goes to the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, "distattn_quiet", False):
        return

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)
    hook.distattn_quiet = True
    threading.excepthook = hook


def _print_line(line: str) -> None:
    print(line, flush=True)


def check_progress(progress: str) -> str:
    """``progress`` itself, or ``ValueError`` for a value not in :data:`PROGRESS`."""
    if progress not in PROGRESS:
        raise ValueError(f"progress must be one of {', '.join(map(repr, PROGRESS))}, got {progress!r}")
    return progress


def resolve_progress(progress: str) -> str:
    """A Trainer's ``progress`` with ``"auto"`` decided: ``"bar"`` on a terminal while the ``distattn``
    logger shows INFO, else ``"log"`` -- the embedding program's logging decides, so
    ``configure_logging("ERROR")`` silences the steps (``"line"`` prints whatever the level)."""
    if check_progress(progress) != "auto":
        return progress
    shown = logging.getLogger("distattn").isEnabledFor(logging.INFO)
    return "bar" if shown and bar_can_draw() else "log"


def bar_can_draw() -> bool:
    """Whether a tqdm bar shows on stdout: a terminal that reports its width (``script -q -c CMD`` and some
    CI consoles give a terminal of 0 columns, where the bar draws nothing)."""
    try:
        return sys.stdout.isatty() and os.get_terminal_size(sys.stdout.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):   # (no file descriptor: a stream in place of stdout)
        return False


def progress_display(progress: str) -> tuple[bool, Callable[[str], None] | None]:
    """(a tqdm bar?, where each logged step's line goes: None for nowhere) for a Trainer's ``progress``."""
    progress = resolve_progress(progress)
    return progress == "bar", {"line": _print_line, "log": _log.info}.get(progress)


class RunLog:
    """Rank 0's progress display, ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, out: Path, steps: int, done: int, bar: bool | None = None,
                 say: Callable[[str], None] | None = _print_line):
        """``done``: steps already taken (a resume); rows logged after them by the run that stopped are
        dropped (:func:`logged_rows`), so each step appears once; new rows are appended. ``bar``: a tqdm
        bar (default: when stdout is a terminal); without one, ``say`` gets each logged step's line
        (None: no line)."""
        out.mkdir(parents=True, exist_ok=True)
        self.steps, self.start, self.first_step = steps, time.perf_counter(), None
        self.path = out / "metrics.jsonl"
        if done:
            logged_rows(self.path, done)
        self.jsonl = open_append(self.path)
        if (out / "tb").is_symlink():
            raise ValueError(f"{out / 'tb'} is a link; a run writes its TensorBoard events into a folder of its "
                             f"own: remove the link")
        try:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            self.tb = SummaryWriter(str(out / "tb"), purge_step=done + 1 if done else None)
        except ImportError:  # tensorboard is optional outside the viz and dev extras
            self.tb = None
            # a warning, not a print: an embedding program silences it with its logging level
            _log.warning(f"TensorBoard is not installed: no events under {out / 'tb'} "
                         f"(pip install 'distattn[viz]')")
        except OSError as exc:
            raise WriteFailed(f"writing TensorBoard events into {out / 'tb'} failed: {exc.strerror}") from None
        self.bar, self.say = None, say
        if bar if bar is not None else sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=done, unit="step", dynamic_ncols=True, file=sys.stdout)

    def step(self, m: dict, record: bool) -> None:
        """Step ``m`` is done: the bar moves; ``record`` (every ``train.log_every`` steps, the last and
        a stopping one) writes it to ``metrics.jsonl``, TensorBoard and, without a bar, the console."""
        summary = (f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  grad {m['grad_norm']:.2f}  "
                   f"{m['tokens_per_s_per_device']:,.0f} tok/s/dev  mfu {_fmt_mfu(m['mfu'])}  "
                   f"mem {m['peak_memory_gib']:.2f} GiB  comm {m['comm_wait_s']:.3f} s  "
                   f"attn-imb {m['flops_imbalance_all']:.2f}"
                   + (f"  dp-imb {m['dp_imbalance']:.2f}" if m.get("dp_imbalance") is not None else ""))
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(1)
        if not record:
            return
        try:
            self.jsonl.write(strict_row(m) + "\n")
            self.jsonl.flush()
        except OSError as exc:   # the next resume drops a half-written line
            raise WriteFailed(f"writing {self.path} failed: {exc.strerror}") from None
        if self.tb is not None:
            try:   # (the events are written by a thread: its error surfaces at a later call)
                for key, val in m.items():
                    if key != "step" and isinstance(val, (int, float)) and not isinstance(val, bool):
                        self.tb.add_scalar(f"train/{key}", val, m["step"])
            except OSError as exc:
                raise WriteFailed(f"writing TensorBoard events into {self.tb.log_dir} failed: {exc.strerror}") \
                    from None
        if self.bar is not None or self.say is None:
            return
        if self.first_step is None:
            self.first_step, self.start = m["step"], time.perf_counter() - m["step_time_s"]
        done = m["step"] - self.first_step + 1
        eta = (time.perf_counter() - self.start) / done * (self.steps - m["step"])
        self.say(f"step {m['step']:>5}/{self.steps}  {summary}  eta {int(eta) // 60}:{int(eta) % 60:02d}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
