#!/usr/bin/env bash
# Wheels the GPU image lacks for the training benchmark (ml_collections and its
# needs; the op, its tests and bench_ops need none), downloaded here into .whl/
# (git-ignored through .git/info/exclude) for the device tool to carry:
#   bash experiments/gpu_wheels.sh   # then run gpu_check.sh with carry=['.whl']
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl ml_collections==1.1.0 absl-py==2.5.1 PyYAML==6.0.3
ls .whl
