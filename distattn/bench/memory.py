"""``python -m distattn.bench.memory``: issue 19 named this command for the memory benchmark, so it keeps working.

The benchmark runs the trainer, so it lives in the train layer, ``distattn.train.bench_memory``; this module
only runs that one as a program, as ``gpu_report`` runs ``distattn.train.bench_gpu_report`` (by its name, not
an import, so the bench layer imports nothing from the trainer)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("distattn.train.bench_memory", run_name="__main__", alter_sys=True)
