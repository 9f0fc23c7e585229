"""``python -m distattn.train.bench_auto`` moved to ``python -m distattn.bench.auto``; the old name runs it,
with a warning, until the next release."""

import runpy
import sys

if __name__ == "__main__":
    print("distattn.train.bench_auto moved to distattn.bench.auto; the old name goes in the next release",
          file=sys.stderr)
    runpy.run_module("distattn.bench.auto", run_name="__main__", alter_sys=True)
