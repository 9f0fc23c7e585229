"""``train.profile_steps: [start, end]``: a ``torch.profiler`` Chrome trace of those steps, per rank.

What torchtitan's ``profiling.enable_profiling`` and Megatron's ``--profile --profile-step-start/end``
give: steps ``start`` to ``end`` (1-based optimizer steps, as ``metrics.jsonl`` counts them; a resumed
run's global step) are recorded with ``torch.profiler`` -- CPU, and CUDA on a GPU -- and written to
``OUT/profile/rank{r}.json`` when the last one ends (or the run does), one file per rank: open it in
Perfetto (ui.perfetto.dev), ``chrome://tracing`` or TensorBoard. Inside it the phases carry
:mod:`distattn.distributed.trace`'s names (``distattn.plan``, ``distattn.forward``, ``distattn.attention``,
``distattn.transfer.*``, ``distattn.wait``, ``distattn.kernels.merge``, ``distattn.dp.*``,
``distattn.optimizer``), the names ``distattn simulate --timeline t.json`` gives its predicted step,
and each step is a ``ProfilerStep#N`` range (``N``: the step).

Outside the profiled steps nothing is recorded and the phases' marks cost nothing measurable.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    """Records the steps of ``steps`` (``(start, end)``, inclusive; None: none) of one rank and writes
    them to ``out/profile/rank{rank}.json``. Use as a context around the step loop, and
    :meth:`step` around each step."""

    def __init__(self, steps, out: Path, rank: int):
        self.steps = None if steps is None else (int(steps[0]), int(steps[1]))
        self.path = Path(out) / "profile" / f"rank{rank}.json"
        self.prof = None

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self._stop()   # a run that ends (or fails) inside the range writes the steps it took

    @contextmanager
    def step(self, number: int):
        """Around step ``number`` (1-based): recording from ``start`` on, written after ``end``."""
        if self.steps is not None and self.prof is None and self.steps[0] <= number <= self.steps[1]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
            self.prof.__enter__()
        if self.prof is None:
            yield
            return
        with record_function(f"ProfilerStep#{number}"):
            yield
        if number >= self.steps[1]:
            self._stop()

    def _stop(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))


__all__ = ["StepProfiler"]
