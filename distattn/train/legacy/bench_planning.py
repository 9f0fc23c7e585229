"""``python -m distattn.train.bench_planning`` moved to ``python -m distattn.bench.plan_ahead``; the old name runs it,
with a warning, until the next release."""

import runpy
import sys

if __name__ == "__main__":
    print("distattn.train.bench_planning moved to distattn.bench.plan_ahead; the old name goes in the next release",
          file=sys.stderr)
    runpy.run_module("distattn.bench.plan_ahead", run_name="__main__", alter_sys=True)
