#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and jax (CUDA), flax, numpy, pytest, torch and
# torchvision installed, it runs the project from the source tree (PYTHONPATH=.) in order of what
# matters most, each part under its own timeout (~6 minutes in all, ~11 with the family):
# torchvision parity (float64 to 1e-12, float32 at precision='highest' to 1e-5, forward and every
# gradient), bench_ops at DCNv4's shapes in float32 (deterministic gradients timed too) and bfloat16
# (torchvision in float16), bench_train (loop vs ideal step, and its PyTorch Net / Deformable_Net), the
# whole main job (42 s on an H100), then the deterministic gradients' bit-identity test on the
# device, then the deformable family (dcnv3 / dcnv4 / ms_deform_attn: parity, bit-identity,
# the family benchmark, bench_ops.py:family; limits of 150 s each). Timings of the parts on an H100 (2026-11-27): 52 s,
# 82 s, 59 s, ~90 s, 42 s, 9 s. The benchmarks and the main job take their settings from config
# files, so they need ml_collections (with absl-py and PyYAML): where it is not importable and .whl/
# holds the wheels `experiments/gpu_wheels.sh` downloads, they are installed from there into
# /tmp/site first; otherwise those parts are skipped.
#
#   bash experiments/gpu_check.sh               # from the source tree; results under experiments/results/
#   OUT=/some/dir bash experiments/gpu_check.sh
#   ONLY=family bash experiments/gpu_check.sh   # the deformable family's parts alone (~5 minutes)
#
# Under $OUT: gpu_check.log, every markdown table, and results.tgz holding the JSON and figures too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
out=${OUT:-experiments/results}
res=$(mktemp -d)
mkdir -p "$out"
log="$out/gpu_check.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>&1;
  $py -c 'import jax, flax, torch, torchvision; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)'; } 2>&1 | tee "$log"
if ! $py -c 'import ml_collections' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
fi
configs=0  # 1: the config files' ml_collections imports, so the benchmarks and the main job can run
$py -c 'import ml_collections' 2>/dev/null && configs=1
status=0
part() { local t=$1; shift; echo "== $* ($(date -u +%T), limit ${t}s)" | tee -a "$log"; timeout "$t" "$@" 2>&1 | tee -a "$log" || { echo "== FAILED or timed out: $*" | tee -a "$log"; status=1; }; }
if [ "${ONLY:-all}" != family ]; then
part 70 $py -m pytest -q -p no:cacheprovider -o addopts= tests/test_torchvision_parity.py
if [ $configs = 1 ]; then
  part 110 $py -m experiments.bench_ops --config.repeats=20 --config.rounds=4 --config.deterministic_gradients=True --out "$res"
  part 60 $py -m experiments.bench_ops --config.repeats=20 --config.rounds=3 --config.dtype=bfloat16 --out "$res"
  part 100 $py -m experiments.bench_train --config.steps=50 --config.rounds=2 --config.examples=4096 --out "$res"
  part 70 $py -m experiments.robustness --out "$res"
else
  echo 'skipped the benchmarks and the main job: ml_collections not importable (its wheels in .whl/: see gpu_wheels.sh)' | tee -a "$log"
fi
part 30 $py -m pytest -q -p no:cacheprovider -o addopts= tests/test_policy.py -k bit_identical
fi
# The deformable family: parity with the PyTorch references (torch on the device), its device-only
# bit-identity test, then its benchmark at the full reference shapes.
part 150 $py -m pytest -q -p no:cacheprovider -o addopts= tests/test_family_parity.py tests/test_family.py -k 'parity or matches or bit_identical'
if [ $configs = 1 ]; then
  part 150 $py -m experiments.bench_ops --config=experiments/configs/bench_ops.py:family --config.repeats=20 --config.rounds=4 --out "$res"
else
  echo 'skipped the family benchmark: ml_collections not importable' | tee -a "$log"
fi
# The main job names its files after its config; on the device they are the _gpu twins.
for f in "$res"/robustness_digits.*; do [ -e "$f" ] && mv "$f" "${f/robustness_digits./robustness_digits_gpu.}"; done
cp "$res"/*.md "$out"/ 2>/dev/null
tar -czf "$out/results.tgz" -C "$res" .
echo "== done $(date -u +%T), status $status" | tee -a "$log"
exit $status
