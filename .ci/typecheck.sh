#!/usr/bin/env bash
# The type check: mypy over deformjax/ with the settings in mypy.ini (the package ships py.typed, so its
# annotations are part of what users get). Runs in the active environment, which must have the package's
# dependencies installed (mypy reads jax's, flax's and numpy's own annotations); installs mypy there when it is
# missing. Extra arguments go to mypy, e.g. `bash .ci/typecheck.sh deformjax/ops` for one subpackage.
set -euo pipefail
cd "$(dirname "$0")/.."
requirement='mypy>=2.4,<3'  # the series the configuration was written against; keep in step with the dev extra
python3 -c 'import mypy' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check "$requirement"
python3 -m mypy --config-file mypy.ini "$@"
