#!/usr/bin/env bash
# Builds the documentation with warnings as errors, fails when a public name of deformjax has
# no entry in the API reference (docs/_ext/coverage_check.py), and runs every Python example of
# the guide and the README (docs/check_examples.py). Offline: no intersphinx, notebooks
# rendered from their stored outputs.
#
#   pip install -e ".[docs]" && bash docs/build.sh        # -> docs/_build/html
#   SPHINXOPTS=-v bash docs/build.sh                       # extra sphinx-build options
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Matplotlib and the notebooks' plotting never need a display here.
export MPLBACKEND=Agg
# The extensions' own doctests (the public-module rule, the docstring fix-ups) first.
python -m pytest -q -p no:cacheprovider -o addopts= --doctest-modules docs/_ext docs/check_examples.py
# -E: a fresh environment every time, so a changed docstring or extension is never served stale.
python -m sphinx -E -W --keep-going -b html ${SPHINXOPTS:-} docs docs/_build/html
# Every Python example of the user guide and the README runs.
python docs/check_examples.py
echo "docs: built docs/_build/html; every public name is documented; every example runs"
