#!/usr/bin/env bash
# The dependency floors: in a fresh virtual environment, install exactly the oldest versions pyproject.toml
# declares for `import deformjax` (every `>=` of [project] dependencies read as `==`), then run the ops, modules
# and models tests there against this source tree. The training system and its extras are not part of the floors.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
mapfile -t floors < <(python3 -c '
import tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
  print(dep.replace(">=", "==").replace(" ", ""))')
echo "floors.sh: ${floors[*]}"
# matplotlib for deformjax.viz (its tests), pytest, pytest-xdist (the tiers' -n auto) and hypothesis for the tests;
# unpinned.
"$py" -m pip install --quiet --disable-pip-version-check "${floors[@]}" pytest pytest-xdist hypothesis matplotlib
"$py" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(jax|jaxlib|flax|numpy|flatbuffers) '
PYTHONPATH="$PWD" "$py" -m pytest -q -x -p no:cacheprovider -m 'not slow' \
  tests/test_args.py tests/test_sampling.py tests/test_deform_conv.py tests/test_roi_pool.py \
  tests/test_ms_deform_attn.py tests/test_nn.py tests/test_models.py tests/test_viz.py tests/test_api.py
