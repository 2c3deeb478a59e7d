"""The experiment entry points run end to end (tiny settings) and write their files."""

from __future__ import annotations

import json

import jax

from experiments import bench_ops, robustness


def test_robustness_study_writes_table_json_and_plot(tmp_path):
  with jax.numpy_dtype_promotion('standard'):
    result = robustness.main(['--config', f'{robustness.DEFAULT_CONFIG}:runlocal', '--seeds', '0',
                              '--out', str(tmp_path)])
  assert len(result['runs']) == 8  # 4 conditions x 2 variants x 1 seed
  saved = json.loads((tmp_path / 'robustness_digits.json').read_text())
  assert {r['variant'] for r in saved['runs']} == {'regular', 'deformable'}
  md = (tmp_path / 'robustness_digits.md').read_text()
  assert '| regular |' in md and '| deformable |' in md and 'original study' in md
  png = (tmp_path / 'robustness_digits.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


def test_bench_ops_writes_json_and_markdown(tmp_path):
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(['--shapes', '2,6,4', '--repeats', '2', '--out', str(tmp_path), '--tag', 't'])
  row = result['rows'][0]
  assert row['fwd_ratio_vs_conv'] > 0 and row['fwd_bwd_ratio_vs_conv'] > 0
  assert json.loads((tmp_path / 'bench_ops_t.json').read_text())['device']
  assert '| 2 | 6x6 | 4->4 |' in (tmp_path / 'bench_ops_t.md').read_text()
