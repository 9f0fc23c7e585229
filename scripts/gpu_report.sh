#!/usr/bin/env bash
# One command for the GPU report: the GPU suite, the kernel benchmark and a short 1-GPU training run per
# attention backend, into one Markdown file (default gpu_report.md). Without a GPU it says so and exits 0.
#   bash scripts/gpu_report.sh [REPORT.md]
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" -m distattn.bench.gpu_report "$@"
