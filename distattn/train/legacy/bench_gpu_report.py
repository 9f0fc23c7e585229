"""``python -m distattn.train.bench_gpu_report`` moved to ``python -m distattn.bench.gpu_report``; the old name runs it,
with a warning, until the next release."""

import runpy
import sys

if __name__ == "__main__":
    print("distattn.train.bench_gpu_report moved to distattn.bench.gpu_report; the old name goes in the next release",
          file=sys.stderr)
    runpy.run_module("distattn.bench.gpu_report", run_name="__main__", alter_sys=True)
