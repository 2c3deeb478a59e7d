#!/usr/bin/env bash
# The prepared accelerator run (under ~6 minutes on an H100): torchvision parity
# (float64 to 1e-12, float32 at precision='highest' to 1e-5, forward and every
# gradient), the op tests on the device (deterministic gradients bit-identical
# there), and bench_ops at DCNv4's shapes in float32 (with deterministic=True
# timed too) and bfloat16 (torchvision in float16). Needs only jax, flax, numpy,
# pytest, torch and torchvision: nothing of the data or training extras.
#
#   bash experiments/gpu_check.sh            # results under experiments/results/
#   OUT=/some/dir bash experiments/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
out=${OUT:-experiments/results}
mkdir -p "$out"
log="$out/gpu_check.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1;
  python -c 'import jax, torch, torchvision; print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, "torchvision", torchvision.__version__)'; } 2>&1 | tee "$log"
status=0
timeout 240 python -m pytest -q -p no:cacheprovider -o addopts= tests/test_torchvision_parity.py tests/test_policy.py \
  2>&1 | tee -a "$log" | tail -25 || status=1
timeout 150 python -m experiments.bench_ops --repeats 20 --rounds 4 --deterministic --out "$out" 2>&1 | tee -a "$log" || status=1
timeout 120 python -m experiments.bench_ops --repeats 20 --rounds 4 --dtype bfloat16 --out "$out" 2>&1 | tee -a "$log" || status=1
exit $status
