"""The names of a step's phases in a profile, and the one helper that marks them.

A profiled training step (``train.profile_steps``, :mod:`distattn.train.profile`) and a simulated one
(``distattn simulate --timeline t.json``, :mod:`distattn.sim.trace`) are both Chrome traces
(``{"traceEvents": [...]}``, what Perfetto, ``chrome://tracing`` and TensorBoard open) whose ranges
carry these names, so a predicted step and a measured one read side by side:

* :data:`PLAN`: making (or waiting for) the step's plans;
* :data:`FORWARD`, :data:`BACKWARD`: the model's passes (in the simulator: the linear pieces'
  compute of each pass, the layers' work outside attention);
* :data:`ATTENTION`: the attention kernel calls; :data:`MERGE`: merging their partial results;
* :data:`TRANSFER` ``.op``: attention's transfers (``op``: one of
  :data:`distattn.planning.schedule.COLLECTIVES`, e.g. ``distattn.transfer.all_to_all``), issued;
  :data:`WAIT`: a rank held at a transfer's wait;
* :data:`DP` ``.op``: the data-parallel transfers (DDP's and zero1's buckets, FSDP's gathers and
  reductions: FSDP2 marks its own as ``FSDP::...`` too); :data:`TP` ``.op``: tensor parallelism's;
* :data:`OPTIMIZER`: the gradient clip and the optimizer step.

:func:`span` marks a range: ``torch.profiler.record_function`` and, on CUDA, an NVTX range. Outside
a profiled region it returns a shared do-nothing context (one attribute read): the hot path pays
nothing measurable (``tests/test_profile.py`` times it).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.autograd.profiler as _profiler

PLAN = "distattn.plan"
FORWARD = "distattn.forward"
BACKWARD = "distattn.backward"
ATTENTION = "distattn.attention"
MERGE = "distattn.kernels.merge"
TRANSFER = "distattn.transfer"
WAIT = "distattn.wait"
DP = "distattn.dp"
TP = "distattn.tp"
OPTIMIZER = "distattn.optimizer"
NAMES = (PLAN, FORWARD, BACKWARD, ATTENTION, MERGE, TRANSFER, WAIT, DP, TP, OPTIMIZER)

_OFF = nullcontext()   # re-entrant and stateless: one instance serves every unprofiled span


def transfer(op: str) -> str:
    """The name of an attention transfer of collective ``op`` (``"all_to_all"``, ``"send_recv"``, ...)."""
    return f"{TRANSFER}.{op}"


def dp(op: str) -> str:
    """The name of a data-parallel transfer of collective ``op``."""
    return f"{DP}.{op}"


class _Range:
    """``record_function(name)`` and, on CUDA, an NVTX range of the same name."""

    __slots__ = ("name", "record", "nvtx")

    def __init__(self, name: str):
        self.name, self.record, self.nvtx = name, _profiler.record_function(name), False

    def __enter__(self):
        self.record.__enter__()
        # (only once CUDA is up: NVTX on a CPU-only build or before initialisation would fail or init it)
        self.nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        return self.record.__exit__(*exc)


def profiling() -> bool:
    """Whether a ``torch.profiler`` profile is recording (what :func:`span` checks)."""
    return _profiler._is_profiler_enabled


def span(name: str):
    """A context that marks ``name`` (one of :data:`NAMES`, or :func:`transfer`/:func:`dp`'s) in the
    profile being recorded; nothing when none is."""
    if not _profiler._is_profiler_enabled:
        return _OFF
    return _Range(name)


__all__ = ["NAMES", "PLAN", "FORWARD", "BACKWARD", "ATTENTION", "MERGE", "TRANSFER", "WAIT", "DP", "TP",
           "OPTIMIZER", "transfer", "dp", "span", "profiling"]
