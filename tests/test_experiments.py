"""The experiment entry points run end to end (tiny settings) and write their files."""

from __future__ import annotations

import json
import pathlib
import subprocess

import jax
import pytest

from experiments import bench_ops, robustness


def test_robustness_study_writes_table_json_and_plot(tmp_path):
  with jax.numpy_dtype_promotion('standard'):
    result = robustness.main(['--config', f'{robustness.DEFAULT_CONFIG}:runlocal', '--seeds', '0', '1', '3',
                              '--out', str(tmp_path)])
  assert len(result['runs']) == 24  # 4 conditions x 2 variants x 3 seeds: seeds 0 and 1 together, 3 alone
  saved = json.loads((tmp_path / 'robustness_digits.json').read_text())
  assert {r['variant'] for r in saved['runs']} == {'regular', 'deformable'}
  assert sorted((r['seed'], r['seeds_together']) for r in saved['runs'])[::8] == [(0, 2), (1, 2), (3, 1)]
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


def test_bench_ops_times_the_deterministic_backward(tmp_path):
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(['--shapes', '2,6,4', '--repeats', '2', '--out', str(tmp_path), '--tag', 't',
                             '--deterministic', '--precision', 'highest', '--dtype', 'bfloat16'])
  row = result['rows'][0]
  assert row['det_fwd_bwd_ms'] > 0 and row['det_fwd_bwd_ratio_vs_default'] > 0
  assert row['columns_bytes'] == 2 * 6 * 6 * 9 * 4 * 4
  assert result['precision'] == 'highest'
  assert 'deterministic fwd+bwd (ms)' in (tmp_path / 'bench_ops_t.md').read_text()


def test_bench_train_times_loop_and_ideal_step(tmp_path):
  from experiments import bench_train

  with jax.numpy_dtype_promotion('standard'):
    result = bench_train.main(['--models', 'cifarnet', '--settings', 'regular', 'modulated', '--steps', '2',
                               '--rounds', '1', '--batch-size', '16', '--examples', '64', '--no-torch',
                               '--out', str(tmp_path)])
  assert [(r['model'], r['setting']) for r in result['rows']] == [('cifarnet', 'regular'), ('cifarnet', 'modulated')]
  for row in result['rows']:
    assert row['loop_ms_per_step'] > 0 and row['ideal_ms_per_step'] > 0
    assert row['ideal_images_per_s'] == pytest.approx(16e3 / row['ideal_ms_per_step'])
  md = next(tmp_path.glob('bench_train_*.md')).read_text()
  assert '| cifarnet | modulated |' in md


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


def test_multilabel_pipeline_end_to_end(tmp_path, monkeypatch):
  """The COCO study's path (BCE, per-class accuracy, mAP) on a multi-label stand-in built from digits:
  each image is labelled with its digit and the next one, so every class has positives."""
  import numpy as np

  from deformjax.data import sources
  from experiments import coco

  spec = sources.DatasetSpec('digits_pairs', (28, 28, 1), 10, multilabel=True,
                             class_names=tuple(str(i) for i in range(10)))

  def fake_source(name, split, data_dir=None):
    base = sources.digits_source(split)
    labels = np.zeros((len(base), 10), np.float32)
    labels[np.arange(len(base)), base.labels] = 1
    labels[np.arange(len(base)), (base.labels + 1) % 10] = 1
    return sources.ArraySource(base.images, labels)

  monkeypatch.setitem(sources.DATASETS, 'digits_pairs', spec)
  monkeypatch.setattr('deformjax.train.loop.load_source', fake_source)
  with jax.numpy_dtype_promotion('standard'):
    result = coco.main(['--config', f'{coco.DEFAULT_CONFIG}:runlocal', '--dataset', 'digits_pairs', '--seeds', '0',
                        '--out', str(tmp_path)])
  run = result['runs'][0]
  assert set(run['per_class_accuracy']) == set(spec.class_names)
  assert 0.0 <= run['mAP'] <= 1.0 and np.isfinite(run['mAP'])
  assert '| deformable |' in (tmp_path / 'multilabel_digits_pairs.md').read_text()


def test_average_precision_matches_the_definition():
  import numpy as np

  from deformjax.train.metrics import average_precision

  scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
  targets = np.array([[1], [0], [1], [0], [1]])
  # precision at each positive's rank: 1/1, 2/3, 3/5 -> AP = mean = (1 + 2/3 + 3/5) / 3
  np.testing.assert_allclose(average_precision(scores, targets), [(1 + 2 / 3 + 3 / 5) / 3])
  assert np.isnan(average_precision(scores, np.zeros_like(targets)))[0]


def test_bench_ops_times_torchvision_in_the_same_rounds(tmp_path, monkeypatch):
  """The torchvision columns come from the interleaved timing like every other case
  (torch itself is only on GPU machines, so a stand-in plays its part here)."""
  calls = []
  fake = lambda name: lambda: calls.append(name)
  monkeypatch.setattr(bench_ops, 'torchvision_cases', lambda *a: (
      {'device': 'cpu', 'torch': 'x', 'torchvision': 'y'}, {'tv_fwd': fake('f'), 'tv_fwd_bwd': fake('fb')}))
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(['--shapes', '2,6,4', '--repeats', '4', '--rounds', '2', '--out', str(tmp_path),
                             '--tag', 't'])
  row = result['rows'][0]
  assert calls.count('f') == calls.count('fb') == 2 + 4  # warm-up, then 2 rounds x 2 runs
  assert row['torchvision']['fwd_bwd_ms'] >= 0 and row['fwd_bwd_ratio_vs_torchvision'] > 0
  assert 'not importable' not in (tmp_path / 'bench_ops_t.md').read_text()


def test_bench_ops_times_a_git_baseline_side_by_side(tmp_path):
  root = pathlib.Path(bench_ops.__file__).resolve().parent.parent
  if subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, check=False).returncode:
    pytest.skip('not a git checkout')
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(['--shapes', '2,6,4', '--repeats', '2', '--out', str(tmp_path), '--tag', 't',
                             '--baseline', 'HEAD'])
  row = result['rows'][0]
  assert row['base_fwd_ms'] > 0 and row['base_fwd_bwd_ratio_vs_conv'] > 0
  assert 'fwd ratio at HEAD' in (tmp_path / 'bench_ops_t.md').read_text()
  with pytest.raises(SystemExit, match='--baseline no-such-rev'):
    bench_ops.main(['--shapes', '2,6,4', '--repeats', '1', '--out', str(tmp_path), '--baseline', 'no-such-rev'])


def test_seed_groups_are_runs_of_consecutive_seeds():
  from experiments.common import seed_groups

  assert seed_groups([0, 1, 2]) == [(0, 3)]
  assert seed_groups([0, 1, 3, 7, 8]) == [(0, 2), (3, 1), (7, 2)]
  assert seed_groups([5]) == [(5, 1)]


@pytest.mark.parametrize('live', [False, True])
def test_study_view_fills_cells_and_stays_quiet_off_a_terminal(live):
  from experiments.common import StudyView

  lines = []
  with StudyView('study', ['regular', 'deformable'], ['baseline', 'rotated'], 40, live=live,
                 echo=lines.append) as view:
    for row in ('regular', 'deformable'):
      for col in ('baseline', 'rotated'):
        view.advance(10)
        view.fill(row, col, '97.00 ± 1.00', f'{row} {col} done')
  assert view.cells[('deformable', 'rotated')] == '97.00 ± 1.00' and len(view.cells) == 4
  if live:
    assert lines == [] and view.progress.tasks[0].completed == 40
  else:
    assert lines == ['regular baseline done', 'regular rotated done', 'deformable baseline done',
                     'deformable rotated done']


def test_experiments_write_to_the_untracked_runs_directory_by_default():
  from experiments import bench_train, coco, scale, training_cost
  from experiments.common import RESULTS, RUNS

  root = pathlib.Path(__file__).resolve().parents[1]
  assert RUNS == root / 'runs' and RESULTS == root / 'experiments' / 'results'
  ignored = subprocess.run(['git', 'check-ignore', '-q', str(RUNS / 'robustness_digits.json')], cwd=root, check=False)
  if ignored.returncode != 128:  # 128: not a git checkout (an sdist); .gitignore is what is checked then
    assert ignored.returncode == 0
  assert '/runs/' in (root / '.gitignore').read_text().splitlines()
  for module in (robustness, bench_ops, bench_train, coco, scale, training_cost):
    source = pathlib.Path(module.__file__).read_text()
    assert "default=RUNS, help=OUT_HELP" in source, module.__name__
