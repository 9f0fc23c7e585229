#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and distattn[dev] installed in editable mode.
# Safe to run again: it only installs what is missing.
#   --with-slurm  also install Debian's slurmctld/slurmd/slurm-client (needs root and apt-get), which the
#                 Slurm end-to-end test runs as a private single-node cluster (it is skipped without them)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--with-slurm" ] && ! command -v slurmctld >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing slurmctld slurmd slurm-client (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        pkgs="slurmctld slurmd slurm-client"
        apt-get install -y -qq $pkgs >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $pkgs >/dev/null 2>&1; } \
            || echo "setup: WARNING: could not install Slurm; its end-to-end test will be skipped"
    else
        echo "setup: WARNING: --with-slurm needs root and apt-get; the Slurm end-to-end test will be skipped"
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: any looser spec would pull the CUDA wheels (gigabytes).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    .venv/bin/pip install -q torch==2.13.0
fi
echo "setup: installing distattn[dev]"
.venv/bin/pip install -q -e ".[dev]"
echo "setup: done ($(.venv/bin/python -c 'import torch, distattn; print("torch", torch.__version__, "/ distattn", distattn.__version__)'))"
# the commands of the README and docs/ are written from the repo root with the .venv/bin/ prefix
echo "setup: run the commands from this folder as written, e.g.
  .venv/bin/distattn train configs/tiny.yaml
  .venv/bin/python -m pytest -q -m quick
or, for a shell without the prefix: source .venv/bin/activate"
