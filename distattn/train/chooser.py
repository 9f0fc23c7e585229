"""Rank 0's per-step choice of CP groups, made in a process of its own (``parallel.scheduler/cp: auto``).

:func:`distattn.sim.per_batch.choose_step` is Python and numpy: up to seconds a step at hundreds of
ranks. On rank 0's plan-ahead thread it shared the GIL with rank 0's step, so every rank waited for
it at the next collective. Here it runs in a child process (``python -m distattn.train.chooser``,
started once), and the thread only waits on a pipe, which releases the GIL. The job, the links and
the candidates go over once at start-up; each step sends its document lengths and the fixed choice,
and gets back the layout, its predicted step and the seconds choosing took. Requests and answers are
pickles on the child's stdin and stdout (a rank is a daemon process, which ``multiprocessing`` does
not let have children); the child ends when its stdin closes, so it never outlives rank 0.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from typing import Any


class ChooserProcess:
    """A child process answering :meth:`choose` for ``job`` (:func:`.auto_plan.job_of`), ``network`` and
    the candidate ``names`` and ``sizes`` (:func:`.auto_plan.candidates`). Not thread-safe: one
    caller (the plan-ahead thread) at a time."""

    def __init__(self, job, network, names: tuple[str, ...], sizes: tuple[int, ...]):
        # one thread: the child is a single search; the ranks' own threads keep the cores
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env)
        self._send((job, network, tuple(names), tuple(sizes)))

    def choose(self, doc_lens: list[int], fixed: list[tuple[str, int, int]]) -> tuple[list, float, float]:
        """``(layout, predicted_step_s, choosing_s)`` for the step's documents and fixed choices
        (:func:`~distattn.sim.per_batch.choose_step`'s): ``layout`` as
        :meth:`~distattn.sim.per_batch.StepChoice.layout` gives it."""
        self._send((list(doc_lens), fixed))
        try:
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError) as exc:
            code = self._proc.poll()
            raise RuntimeError(f"the chooser process (parallel.scheduler/cp: auto) ended with exit code {code}: "
                               f"see its error above") from exc
        if status != "ok":
            raise RuntimeError(f"the chooser process (parallel.scheduler/cp: auto) failed: {value}")
        return value

    def _send(self, request) -> None:
        try:
            pickle.dump(request, self._proc.stdin)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise RuntimeError(f"the chooser process (parallel.scheduler/cp: auto) is gone (exit code "
                               f"{self._proc.poll()})") from exc

    def close(self) -> None:
        """End the child (its stdin closes; killed if it has not ended within 5 s). Idempotent."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()


def _answer(job, network, names, sizes, doc_lens, fixed) -> tuple[list, float, float]:
    from ..sim.per_batch import choose_step

    t0 = time.perf_counter()
    got = choose_step(job, doc_lens, network, names, None if len(sizes) > 1 else sizes, fixed=fixed)
    return got.layout(), got.predicted_step_s, time.perf_counter() - t0


def main() -> None:
    """The child: the set-up, then one answer per request until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # whatever the search prints must not enter the answers' pipe
    try:
        setup = pickle.load(stdin)
    except EOFError:
        return
    while True:
        try:
            doc_lens, fixed = pickle.load(stdin)
        except EOFError:
            return
        try:
            answer: Any = ("ok", _answer(*setup, doc_lens, fixed))
        except Exception as exc:   # (handed to rank 0, which raises it where the step takes its plans)
            answer = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(answer, stdout)
        stdout.flush()


if __name__ == "__main__":
    main()
