"""Rank 0's per-step choice of CP groups, made in a process of its own (``parallel.scheduler/cp: auto``).

:func:`distattn.sim.per_batch.choose_step` is Python and numpy: up to seconds a step at hundreds of
ranks. On rank 0's plan-ahead thread it shared the GIL with rank 0's step, so every rank waited for
it at the next collective. Here it runs in a child process (``python -m distattn.train.chooser``,
started once), and the thread only waits on a pipe, which releases the GIL. The job, the links and
the candidates go over once at start-up; each step sends its document lengths and the fixed choice,
and gets back the layout, its predicted step and the seconds choosing took. Requests are pickles on
the child's stdin, answers length-prefixed pickles on its stdout (a rank is a daemon process, which
``multiprocessing`` does not let have children); the child ends when its stdin closes, so it never
outlives rank 0.

A chooser that dies or stops answering must not hold the run: every rank waits for rank 0's choice
(:class:`~.auto_plan.SharedChoice`), so :meth:`ChooserProcess.choose` waits a bounded time
(select on the pipes, never a blocking read) -- until its first answer ``start_s``, then
``max(floor_s, factor x`` the median answer's seconds``)`` -- and on a death or a silence it kills the
child, logs it once and answers None: that step runs the fixed choice, published like any choice, so
no rank waits for it. The child restarts once; until the new one says it is ready, and for the rest of
the run after a second loss, every step runs the fixed choice at once.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import select
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

_log = logging.getLogger(__name__)
_HEADER = struct.Struct("<Q")   # an answer's length, before its pickle
_READY = "ready"                # the child's first message: set up, its imports done


class ChooserGone(Exception):
    """The child died or gave no answer in time (internal: :meth:`ChooserProcess.choose` answers None)."""

    def __init__(self, hung: bool = False):
        super().__init__()
        self.hung = hung


class ChooserProcess:
    """A child process answering :meth:`choose` for ``job`` (:func:`.auto_plan.job_of`), ``network`` and
    the candidate ``names`` and ``sizes`` (:func:`.auto_plan.candidates`). ``start_s``: the most a
    child's first answer may take (its imports, the job's fits); ``floor_s`` and ``factor``: a later answer's bound,
    ``max(floor_s, factor x the median answer)``; ``limit_s`` caps both (the other ranks' store
    timeout must not run out first). Not thread-safe: one caller (the plan-ahead thread) at a time."""

    def __init__(self, job, network, names: tuple[str, ...], sizes: tuple[int, ...], start_s: float = 600.0,
                 floor_s: float = 5.0, factor: float = 10.0, limit_s: float | None = None):
        if min(start_s, floor_s, factor) <= 0 or (limit_s is not None and limit_s <= 0):
            raise ValueError("ChooserProcess: start_s, floor_s, factor and limit_s must be positive")
        self._setup = (job, network, tuple(names), tuple(sizes))
        self._start_s, self._floor_s, self._factor = start_s, floor_s, factor
        self._limit_s = float("inf") if limit_s is None else limit_s
        self._seconds: collections.deque[float] = collections.deque(maxlen=64)   # recent answers' round trips
        self._restarts = 1
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._restarted = False
        self._answers = 0
        self._spawned = 0.0
        self._spawn()

    @property
    def pid(self) -> int | None:
        """The running child's process id; None once the run has given the chooser up."""
        return None if self._proc is None else self._proc.pid

    @property
    def answers(self) -> int:
        """Answers the current child has given."""
        return self._answers

    def bound_s(self) -> float:
        """The seconds the next answer may take before the child counts as hung: ``start_s`` for a child's
        first (its start-up, and the job's fits it makes on its first step's documents), then ``max(floor_s,
        factor x`` the median of later ones, a restarted child's and the first child's``)``."""
        if not self._answers:
            return min(self._start_s, self._limit_s)
        median = statistics.median(self._seconds) if self._seconds else 0.0
        return min(max(self._floor_s, self._factor * median), self._limit_s)

    def choose(self, doc_lens: list[int], fixed: list[tuple[str, int, int]]) -> tuple[list, float, float] | None:
        """``(layout, predicted_step_s, choosing_s)`` for the step's documents and fixed choices
        (:func:`~distattn.sim.per_batch.choose_step`'s): ``layout`` as
        :meth:`~distattn.sim.per_batch.StepChoice.layout` gives it. None: no answer this step (the child
        died, hung, is restarting or was given up; logged): run the fixed choice."""
        if self._proc is None:
            return None
        bound = self.bound_s()
        deadline = time.monotonic() + bound
        try:
            if not self._check_ready(deadline, wait=not self._restarted):
                if self._restarted and time.monotonic() - self._spawned < min(self._start_s, self._limit_s):
                    return None   # a restarted child is not waited for: the fixed choice until it is ready
                raise ChooserGone(hung=True)
            t0 = time.perf_counter()   # (an answer's seconds: the search and the pipes, not the start-up)
            self._write(pickle.dumps((list(doc_lens), fixed)), deadline)
            status, value = self._read(deadline)
        except ChooserGone as gone:
            self._lost(bound if gone.hung else None)
            return None
        if status != "ok":
            raise RuntimeError(f"the chooser process (parallel.scheduler/cp: auto) failed: {value}")
        if self._answers:   # (a child's first answer is no measure of the others)
            self._seconds.append(time.perf_counter() - t0)
        self._answers += 1
        return value

    def started(self, timeout_s: float = 0.0) -> bool:
        """Whether the child has finished starting -- said it is ready, or ended (the next :meth:`choose`
        finds out which, and says so) --, waiting up to ``timeout_s`` for it. It only looks at the pipe:
        another thread may :meth:`choose` meanwhile."""
        deadline = time.monotonic() + timeout_s
        while not self._ready:
            proc = self._proc
            try:
                left = min(0.1, max(0.0, deadline - time.monotonic()))
                if proc is None or select.select([proc.stdout], [], [], left)[0]:
                    return proc is not None
            except (OSError, ValueError):   # (its pipe closed meanwhile: the other thread found it gone)
                return False
            if time.monotonic() >= deadline:
                return False
        return True

    def _check_ready(self, deadline: float, wait: bool) -> bool:
        """Whether the child is ready, taking its "ready" (waiting for it until ``deadline`` with ``wait``)."""
        if self._proc is None:
            return False
        fd = self._proc.stdout.fileno()
        if not self._ready and select.select([fd], [], [], max(0.0, deadline - time.monotonic()) if wait else 0)[0]:
            message = self._read(deadline)   # (readable: its one small write is whole in the pipe, or it ended)
            assert message == _READY, message
            self._ready = True
        return self._ready

    def _spawn(self) -> None:
        # one thread: the child is a single search; the ranks' own threads keep the cores
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, bufsize=0)
        os.set_blocking(self._proc.stdin.fileno(), False)   # (a stopped child must not block a write)
        self._ready, self._answers, self._spawned = False, 0, time.monotonic()
        try:
            self._write(pickle.dumps(self._setup), time.monotonic() + min(self._start_s, self._limit_s))
        except ChooserGone:
            pass   # (the first choose finds it gone)

    def _write(self, data: bytes, deadline: float) -> None:
        fd, view = self._proc.stdin.fileno(), memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise ChooserGone(hung=True)
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError as exc:   # (a broken pipe: the child is gone)
                raise ChooserGone() from exc

    def _read(self, deadline: float) -> Any:
        """The child's next message by ``deadline``."""
        fd = self._proc.stdout.fileno()
        (size,) = _HEADER.unpack(self._read_bytes(fd, _HEADER.size, deadline))
        return pickle.loads(self._read_bytes(fd, size, deadline))

    @staticmethod
    def _read_bytes(fd: int, size: int, deadline: float) -> bytes:
        got = bytearray()
        while len(got) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ChooserGone(hung=True)
            chunk = os.read(fd, size - len(got))
            if not chunk:   # end of file: the child is gone
                raise ChooserGone()
            got += chunk
        return bytes(got)

    def _lost(self, hung_s: float | None) -> None:
        """The child died (``hung_s`` None) or gave no answer in ``hung_s``: end it, say so once,
        restart it if it has not been already."""
        code = self._end(kill=hung_s is not None)
        if self._restarts:
            self._restarts -= 1
            self._restarted = True
            self._spawn()
            then = "while it restarts (once)"
        else:
            self._proc = None
            then = "for the rest of the run (it was restarted once already)"
        what = f"exited (code {code})" if hung_s is None else \
            f"gave no answer in {hung_s:.1f} s (stopped or hung; killed, code {code})"
        _log.warning("parallel.scheduler/cp auto: chooser %s; running the fixed choice %s", what, then)

    def _end(self, kill: bool) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                if kill:
                    proc.kill()
                else:
                    proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return proc.returncode

    def close(self) -> None:
        """End the child (its stdin closes; killed if it has not ended within 5 s). Idempotent."""
        self._end(kill=False)


def _answer(job, network, names, sizes, doc_lens, fixed) -> tuple[list, float, float]:
    from ..sim.per_batch import choose_step

    t0 = time.perf_counter()
    got = choose_step(job, doc_lens, network, names, None if len(sizes) > 1 else sizes, fixed=fixed)
    return got.layout(), got.predicted_step_s, time.perf_counter() - t0


def _send(stdout, message) -> None:
    data = pickle.dumps(message)
    stdout.write(_HEADER.pack(len(data)) + data)
    stdout.flush()


def main() -> None:
    """The child: the set-up, "ready", then one answer per request until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # whatever the search prints must not enter the answers' pipe
    try:
        setup = pickle.load(stdin)
    except EOFError:
        return
    # imported before "ready"; no warm-up search: the first step's documents size the job's fits
    # (distattn.sim.screen.screen_of), so a made-up one would change later choices
    from ..sim import per_batch  # noqa: F401
    _send(stdout, _READY)
    while True:
        try:
            doc_lens, fixed = pickle.load(stdin)
        except EOFError:
            return
        try:
            answer: Any = ("ok", _answer(*setup, doc_lens, fixed))
        except Exception as exc:   # (handed to rank 0, which raises it where the step takes its plans)
            answer = ("error", f"{type(exc).__name__}: {exc}")
        _send(stdout, answer)


if __name__ == "__main__":
    main()
