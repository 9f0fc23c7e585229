#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and distattn[dev] installed in editable mode.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: any looser spec would pull the CUDA wheels (gigabytes).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    .venv/bin/pip install -q torch==2.13.0
fi
echo "setup: installing distattn[dev]"
.venv/bin/pip install -q -e ".[dev]"
echo "setup: done ($(.venv/bin/python -c 'import torch, distattn; print("torch", torch.__version__, "/ distattn", distattn.__version__)'))"
