#!/usr/bin/env bash
# GPU readiness check of fmgs-avatar: every CUDA path in one short, time-boxed run.
#
#   bash benchmarks/gpu_check.sh stage            # on the CPU machine: data subset + wheels -> .gpucheck/
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (device tool: carry ['.gpucheck'])
#   bash benchmarks/gpu_check.sh --dry-run        # anywhere: the check's own logic, GPU halves skipped
#
# Report: gpu_check.json, gpu_check.md, gpu_check.log in --out (default $OUT, else
# gpu_check_out). All options: bash benchmarks/gpu_check.sh run --help
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
