"""Every notebook runs top to bottom (quick settings) in a fresh kernel."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS] == ['01_op_tour.ipynb', '02_training.ipynb', '03_roi_pooling.ipynb']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv('DEFORMJAX_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  nb = nbformat.read(path, as_version=4)
  assert 'colab-badge' in nb.cells[0].source
  assert 'import deformjax' in nb.cells[1].source and '%pip install' in nb.cells[1].source
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
  assert not errors, errors
