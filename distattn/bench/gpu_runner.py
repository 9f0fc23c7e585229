"""The GPU report's trainings as processes: each :class:`~.bench_gpu_plan.TrainRun` is ``python -m distattn.cli
train CONFIG`` with the variables torchrun gives the one rank of a one-GPU job (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``, ...: the trainer joins an nccl group, as under torchrun), in a session
of its own.

The report reads ``metrics.jsonl`` while a run trains and stops the run's process group once the last
step's row is there: the trainer then only saves its last checkpoint (for the 8B-shaped stack 23 GB of
weights and AdamW state, written and hashed), which the report does not need. Every metric is logged
before that save, so nothing measured is lost. The run folder is deleted afterwards.

Runs given together share the GPU (:func:`run_waves`: the memory comparison, which reports each
process's own ``torch.cuda.max_memory_allocated`` and no timing); a run that fails for lack of memory
beside others is run again alone. Runs whose times are reported run one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .gpu_plan import TrainRun, waves

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.5
RUN_CAP_S = 300             # one run (or wave) at most, within what is left of the report's budget
SKIPPED = -1                # Outcome.code of a run the budget left no time for
STOPPED = 0                 # Outcome.code of a run the report stopped after its last row (as a clean exit)


@dataclass
class Outcome:
    """What a run left: the exit code (:data:`STOPPED` when the report stopped it after its last row,
    124 past its time, :data:`SKIPPED` never started), its ``metrics.jsonl`` rows, seconds, the log's
    tail and how many runs shared the GPU with it (itself included)."""

    run: TrainRun
    code: int
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    log: str = ""
    together: int = 1

    @property
    def ok(self) -> bool:
        return self.code in (0, STOPPED) and len(self.rows) >= self.run.steps

    @property
    def out_of_memory(self) -> bool:
        return "out of memory" in self.log.lower() or "OutOfMemoryError" in self.log

    def why(self) -> str:
        """One line on a failed run."""
        if self.code == SKIPPED:
            return "skipped: the report's time budget is spent"
        last = self.log.strip().splitlines()[-1][:200] if self.log.strip() else ""
        return f"failed (exit {self.code}, {len(self.rows)}/{self.run.steps} steps): {last}"


def rank_env(port: int) -> dict[str, str]:
    """This environment plus what torchrun sets for the only rank of a one-GPU job."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0", ROLE_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a ``metrics.jsonl`` being written (a line without its newline yet is left)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _stop(popen: subprocess.Popen) -> None:
    """Kill the run's process group (its session: the trainer and anything it started)."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.wait()


def run_together(runs: list[TrainRun], tmp: Path, timeout_s: float, tag: str = "") -> list[Outcome]:
    """Start every run at once and wait for all (module docstring); one :class:`Outcome` per run."""
    started = []
    for i, run in enumerate(runs):
        stem = tmp / f"run{tag}{i}"
        config, out, log = stem.with_suffix(".yaml"), stem, stem.with_suffix(".log")
        config.write_text(run.yaml(str(out)))
        with open(log, "w") as sink:
            popen = subprocess.Popen([sys.executable, "-m", "distattn.cli", "train", str(config)], cwd=ROOT,
                                     env=rank_env(_free_port()), stdout=sink, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        started.append((run, popen, out, log, time.perf_counter()))
    outcomes: dict[int, Outcome] = {}
    try:
        _wait(started, outcomes, timeout_s, len(runs))
    finally:   # an error or Ctrl-C here leaves no training behind on the GPU
        for i, (_, popen, out, _, _) in enumerate(started):
            if i not in outcomes:
                _stop(popen)
                shutil.rmtree(out, ignore_errors=True)
    return [outcomes[i] for i in range(len(started))]


def _wait(started: list, outcomes: dict[int, Outcome], timeout_s: float, together: int) -> None:
    """Poll the started runs until each has an outcome."""
    while len(outcomes) < len(started):
        for i, (run, popen, out, log, t0) in enumerate(started):
            if i in outcomes:
                continue
            rows, seconds = read_rows(out / "metrics.jsonl"), time.perf_counter() - t0
            code = None
            if len(rows) >= run.steps:
                _stop(popen)
                code = STOPPED
            elif popen.poll() is not None:
                code = popen.returncode
                rows = read_rows(out / "metrics.jsonl")
            elif seconds > timeout_s:
                _stop(popen)
                code = 124
            if code is not None:
                outcomes[i] = Outcome(run, code, rows, seconds, _tail(log), together)
                shutil.rmtree(out, ignore_errors=True)
        if len(outcomes) < len(started):
            time.sleep(POLL_S)


def run_alone(runs: list[TrainRun], tmp: Path, deadline: float, on_done=None) -> list[Outcome]:
    """One run at a time (their times are reported), each within what is left before ``deadline``
    (``time.perf_counter()``); ``on_done(its outcomes)`` after each."""
    outcomes = []
    for i, run in enumerate(runs):
        left = min(RUN_CAP_S, deadline - time.perf_counter())
        new = [Outcome(run, SKIPPED)] if left < 20 else run_together([run], tmp, left, tag=f"a{i}_")
        outcomes += new
        if on_done is not None:
            on_done(new)
    return outcomes


def run_waves(runs: list[TrainRun], tmp: Path, gpu_bytes: int, deadline: float, on_done=None) -> list[Outcome]:
    """The runs in waves sharing the GPU (:func:`~.bench_gpu_plan.waves` by their estimates), then again
    alone any that ran out of memory beside others; outcomes in the runs' order (``on_done(outcomes)``
    after each wave and each run again)."""
    by_name = {run.name: run for run in runs}
    done: dict[str, Outcome] = {}
    for w, names in enumerate(waves([(run.name, run.estimate().total) for run in runs], gpu_bytes)):
        left = min(RUN_CAP_S, deadline - time.perf_counter())
        wave = [by_name[name] for name in names]
        results = [Outcome(run, SKIPPED) for run in wave] if left < 20 else run_together(wave, tmp, left, f"w{w}_")
        done.update({o.run.name: o for o in results})
        if on_done is not None:
            on_done(results)
    for i, run in enumerate(runs):
        first = done[run.name]
        left = min(RUN_CAP_S, deadline - time.perf_counter())
        if not first.ok and first.together > 1 and first.out_of_memory and left >= 20:
            done[run.name] = run_together([run], tmp, left, f"r{i}_")[0]
            if on_done is not None:
                on_done([done[run.name]])
    return [done[run.name] for run in runs]
