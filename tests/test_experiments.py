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


def test_scale_study_writes_tables_and_figures(tmp_path):
  from experiments import scale

  with jax.numpy_dtype_promotion('standard'):
    result = scale.main(['--config', f'{scale.DEFAULT_CONFIG}:runlocal', '--out', str(tmp_path)])
  assert {r['variant'] for r in result['runs']} == {'regular', 'deformable'}
  assert set(result['effective_dilation']['per_seed'][0]) == {'conv3', 'conv4', 'conv5'}
  md = (tmp_path / 'scale_digits.md').read_text()
  assert 'mean over scales' in md and 'effective dilation' in md
  for png in ('scale_digits_accuracy.png', 'scale_digits_dilation.png', 'scale_digits_sampling_scale1.0.png'):
    assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'


def test_training_cost_study(tmp_path):
  from experiments import training_cost

  with jax.numpy_dtype_promotion('standard'):
    result = training_cost.main(['--steps', '3', '--repeats', '1', '--out', str(tmp_path)])
  assert [r['setting'] for r in result['rows']][0] == 'regular'
  assert result['rows'][0]['ratio_vs_regular'] == 1.0
  assert (tmp_path / 'training_cost_digits_cpu.png').read_bytes()[:4] == b'\x89PNG'
