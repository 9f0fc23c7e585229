"""Training: the trainer (``distattn train CONFIG``) and its wings.

The loop lives here: :mod:`.trainer` (:class:`~.trainer.Trainer`, one optimizer step at a time),
:mod:`.plan_ahead` and :mod:`.auto_plan` (each step's batch and plans, made on a thread; ``cp`` /
``scheduler: auto`` choosing them per step), :mod:`.ranks` (process groups, signals),
:mod:`.metrics` (the per-step rows and the progress line) and :mod:`.safe_io` (bounded reads of
files a run did not write). The wings below it, each a package with its own map:

* :mod:`.config`: the run's YAML into frozen dataclasses, checked;
* :mod:`.data`: corpora, the packer and a step's global batch;
* :mod:`.model`: the reference Llama-style model, its loss and memory savers;
* :mod:`.checkpoint`: DCP checkpoints with manifests, and resuming;
* :mod:`.preflight`: the checks and memory estimate made before any rank starts.

The benchmarks that run the trainer live in :mod:`distattn.bench`.
"""

from pathlib import Path

# `python -m distattn.train.bench_*` (moved to distattn.bench) keeps working until the next release
__path__.append(str(Path(__file__).with_name("legacy")))
