"""``python -m distattn.bench.gpu_report`` (what ``bash scripts/gpu_report.sh`` runs): the GPU report, which keeps
this command.

The report plans its trainings with the trainer's own config loader, memory estimate and length search, so
it lives in the train layer: ``distattn.train.bench_gpu_report`` (its plan ``bench_gpu_plan``, its runs
``bench_gpu_runner``, its tables ``bench_gpu_tables``). This module only runs that one as a program, as
``distattn.bench.memory`` runs ``distattn.train.bench_memory`` (by its name, not an import, so the bench
layer imports nothing from the trainer)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("distattn.train.bench_gpu_report", run_name="__main__", alter_sys=True)
