#!/usr/bin/env bash
# One command for the GPU check (benchmarks/gpu_check.py): on CUDA, full vs DGST AMP fine-tuning steps, the
# host-sync check and sliding-window inference; on a CPU-only machine it runs the CPU side, says that it skipped
# the GPU parts and exits 0. Extra arguments go to gpu_check.py (e.g. --json out.json).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# one CPU thread unless the caller says otherwise: the CPU side is a tiny network and the machine may be shared
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
