"""``python -m distattn.train.bench_activation_memory`` moved to ``python -m distattn.bench.activation_memory``; the old name runs it,
with a warning, until the next release."""

import runpy
import sys

if __name__ == "__main__":
    print("distattn.train.bench_activation_memory moved to distattn.bench.activation_memory; the old name goes in the next release",
          file=sys.stderr)
    runpy.run_module("distattn.bench.activation_memory", run_name="__main__", alter_sys=True)
