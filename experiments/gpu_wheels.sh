#!/usr/bin/env bash
# Downloads into .whl/ of the source tree (git-ignored through .git/info/exclude) the wheels
# that the training parts of gpu_check.sh need and a GPU machine's Python 3.12 may lack:
# ml_collections and its needs (the ops, their tests and bench_ops need none). gpu_check.sh
# installs them from .whl/ when ml_collections is not importable. Needs network access:
#   bash experiments/gpu_wheels.sh   # then, on the GPU machine: bash experiments/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl ml_collections==1.1.0 absl-py==2.5.1 PyYAML==6.0.3
ls .whl
