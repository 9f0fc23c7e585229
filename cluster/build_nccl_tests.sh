#!/usr/bin/env bash
# Build NVIDIA's nccl-tests for `distattn cluster nccl-tests --bin-dir DIR/build`.
#   bash build_nccl_tests.sh [DIR] [REF]      (defaults: ./nccl-tests, master)
# Environment: CUDA_HOME (default /usr/local/cuda), NCCL_HOME (default: NCCL from the CUDA toolkit or
# the system), MPI=1 with MPI_HOME for multi-node runs under mpirun (srun needs MPI=1 as well).
set -euo pipefail
dir=${1:-nccl-tests}
ref=${2:-master}
command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
    || { echo "build_nccl_tests: nvcc not found; set CUDA_HOME to a CUDA toolkit" >&2; exit 1; }
if [ ! -d "$dir/.git" ]; then
    git clone --depth 1 --branch "$ref" https://github.com/NVIDIA/nccl-tests.git "$dir"
fi
args=(CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MPI="${MPI:-0}")
[ -n "${NCCL_HOME:-}" ] && args+=(NCCL_HOME="$NCCL_HOME")
[ -n "${MPI_HOME:-}" ] && args+=(MPI_HOME="$MPI_HOME")
make -C "$dir" -j "$(nproc)" "${args[@]}"
echo "built: $dir/build ($(ls "$dir/build" | grep -c _perf) benchmarks); run:"
echo "  distattn cluster nccl-tests --bin-dir $dir/build --gpus \$(nvidia-smi -L | wc -l)"
