"""Every notebook is a valid Colab notebook that installs and imports the library; the slow tier runs each
top to bottom (quick settings) in a fresh kernel."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_uses_the_library(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)  # raises on a notebook Jupyter or Colab would refuse
  assert 'import deformjax' in nb.cells[1].source and '%pip install' in nb.cells[1].source


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('DEFORMJAX_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
  assert not errors, errors
