"""``python -m distattn.train.bench_compiled_step`` moved to ``python -m distattn.bench.compiled_step``; the old name runs it,
with a warning, until the next release."""

import runpy
import sys

if __name__ == "__main__":
    print("distattn.train.bench_compiled_step moved to distattn.bench.compiled_step; the old name goes in the next release",
          file=sys.stderr)
    runpy.run_module("distattn.bench.compiled_step", run_name="__main__", alter_sys=True)
