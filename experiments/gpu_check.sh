#!/usr/bin/env bash
# The prepared accelerator run (each part under its own timeout, 590 s at most in all): torchvision parity
# (float64 to 1e-12, float32 at precision='highest' to 1e-5, forward and every
# gradient), the op tests on the device (deterministic gradients bit-identical
# there), bench_ops at DCNv4's shapes in float32 (with deterministic=True timed
# too) and bfloat16 (torchvision in float16), then bench_train (loop vs ideal
# step, seed 001's PyTorch nets) and the main job at 2 epochs. The op part needs
# only jax, flax, numpy, pytest, torch and torchvision; the training part also
# ml_collections, which the GPU image lacks: `bash experiments/gpu_wheels.sh`
# here puts its wheels in .whl/, which the device tool carries (carry=['.whl']).
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
if ! python -c 'import ml_collections' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
fi
status=0
timeout 200 python -m pytest -q -p no:cacheprovider -o addopts= tests/test_torchvision_parity.py tests/test_policy.py \
  2>&1 | tee -a "$log" | tail -25 || status=1
timeout 120 python -m experiments.bench_ops --repeats 20 --rounds 4 --deterministic --out "$out" 2>&1 | tee -a "$log" || status=1
timeout 120 python -m experiments.bench_ops --repeats 20 --rounds 4 --dtype bfloat16 --out "$out" 2>&1 | tee -a "$log" || status=1
if python -c 'import ml_collections' 2>/dev/null; then
  timeout 90 python -m experiments.bench_train --steps 100 --rounds 3 --examples 8192 --out "$out" 2>&1 | tee -a "$log" || status=1
  timeout 60 python -m experiments.robustness --epochs 2 --seeds 0 --out "$out" 2>&1 | tail -12 | tee -a "$log" || status=1
else
  echo 'skipped bench_train and the main job: ml_collections not importable (carry .whl, see gpu_wheels.sh)' | tee -a "$log"
fi
exit $status
