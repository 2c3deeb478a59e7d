"""Runs the notebooks top to bottom and stores their outputs, which the documentation renders.

The documentation build never executes code (``nb_execution_mode = 'off'``): it shows the
outputs stored in ``notebooks/*.ipynb``. Refresh them after changing a notebook or the code it
shows::

  python docs/execute_notebooks.py                       # every notebook, full settings, in place
  python docs/execute_notebooks.py notebooks/01_op_tour.ipynb --out /tmp/nb

Each notebook runs in a fresh kernel that imports this checkout's ``deformjax``, in a
temporary working directory (files a notebook writes do not land in the repository), with
matplotlib's inline backend so figures are stored as PNG outputs. Cell timings are not
recorded, so a re-run changes only what the outputs themselves change. A notebook that raises
is not written, and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(path: pathlib.Path, *, timeout: int, quick: bool) -> nbformat.NotebookNode:
  """The notebook at `path` with fresh outputs (raises nbclient's CellExecutionError on an error)."""
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
      cell.metadata.pop('execution', None)
  env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}  # inline figures, not Agg
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), *filter(None, [env.get('PYTHONPATH')])])
  if quick:
    env['DEFORMJAX_NOTEBOOK_QUICK'] = '1'
  else:
    env.pop('DEFORMJAX_NOTEBOOK_QUICK', None)
  with tempfile.TemporaryDirectory(prefix='deformjax-nb-') as cwd:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3', record_timing=False,
                                     resources={'metadata': {'path': cwd}})
    # The kernel inherits the environment of the process that starts it.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
      client.execute()
    finally:
      os.environ.clear()
      os.environ.update(saved)
  nbformat.validate(nb)
  return nb


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('notebooks', nargs='*', type=pathlib.Path,
                      default=sorted((ROOT / 'notebooks').glob('*.ipynb')), help='default: notebooks/*.ipynb')
  parser.add_argument('--out', type=pathlib.Path, default=None, help='write here instead of in place')
  parser.add_argument('--timeout', type=int, default=900, help='seconds one cell may take')
  parser.add_argument('--quick', action='store_true', help="the test suite's small settings")
  args = parser.parse_args(argv)
  failed = []
  for path in args.notebooks:
    start = time.perf_counter()
    try:
      nb = execute(path, timeout=args.timeout, quick=args.quick)
    except nbclient.exceptions.CellExecutionError as e:
      print(f'execute_notebooks: {path.name}: FAILED, not written\n{e}', file=sys.stderr)
      failed.append(path.name)
      continue
    target = path if args.out is None else args.out / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    outputs = sum(len(c.outputs) for c in nb.cells if c.cell_type == 'code')
    print(f'execute_notebooks: {path.name}: {outputs} outputs in {time.perf_counter() - start:.0f} s -> {target}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
