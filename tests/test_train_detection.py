"""The train system training a detector: `config.task='detection'`, the built-in canvases and Deformable DETR, the
config fields they add (detector, canvas, warmup, gradient clipping), the command line and resume.

The runs (a detector compiles for about 20 s) are in the slow tier; the fast tier checks the configuration, the
optimiser's new fields and the data the task is given, without compiling a detector.
"""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deformjax.train import ConfigError, base_config, canvas_sources, cli, train, validate
from deformjax.train.steps import make_optimizer
from tests.helpers import ROOT, assert_same_params, at_step, leaves, params_of, quiet, records, set_fields

DETECTION_CONFIG = str(ROOT / 'experiments' / 'configs' / 'detection.py')


def detection_config(**overrides):
  """The detection config file's smoke-test run (`:runlocal`), with `overrides`."""
  from experiments.configs.detection import get_config

  cfg = get_config('runlocal')
  cfg.progress = False
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.mark.parametrize('fields,message', [
    ({'task': 'segmentation'}, r"config.task must be one of 'classification', 'detection', got 'segmentation'"),
    ({'model': 'conv5'}, r"config.task='detection' trains a detector: set config.model='deformable_detr'"),
    ({'dataset': 'cifar10'}, r"places the digits of config.dataset on canvases: 'digits' or 'mnist5k', got "
                              "'cifar10'"),
    ({'train_augment.max_shift': 2.0}, r'config.train_augment warps the images, and detection boxes would not'),
    ({'eval_sets.baseline.max_rotation_deg': 10.0}, r'config.eval_sets.baseline warps the images'),
    ({'grad_clip': -1.0}, r'config.grad_clip must be a finite number >= 0 \(0: no clipping\), got -1.0'),
    ({'warmup_steps': -2}, r'config.warmup_steps must be an int >= 0, got -2'),
    ({'canvas.train_images': 0}, r'config.canvas.train_images must be a positive int, got 0'),
    ({'canvas.num_digits': (0, 2)}, r'config.canvas.num_digits must be \(min, max\) with 1 <= min <= max, got '
                                    r'\(0, 2\)'),
    ({'canvas.size': 16}, r'config.canvas.digit_size must be \(min, max\) with 4 <= min <= max <= '
                          r'config.canvas.size=16, got \(12, 20\)'),
])
def test_a_detection_config_that_cannot_train_is_refused_in_one_line(fields, message):
  with pytest.raises(ConfigError, match=message):
    validate(set_fields(detection_config(), fields), 1)


def test_detection_without_its_solver_or_evaluator_is_refused_before_training(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'pycocotools' else real(name, *a))
  with pytest.raises(ConfigError, match=r"config.task='detection' needs pycocotools \(the Hungarian matcher, "
                                        r"COCO's evaluation\): pip install 'deformjax\[detection\]'"):
    validate(detection_config(), 1)


def test_run_json_records_what_the_run_trains_and_a_refusal_names_the_differing_leaves(tmp_path):
  """A detection run records its detector without the loss weights, and its canvases; not the classifier
  fields; nor the detector or the canvases that `model=` / `sources=` replaced. A workdir of another detector is
  refused by the leaves that differ."""
  from types import SimpleNamespace

  from deformjax.detection import Detection
  from deformjax.train.loop import _check_same_run, _run_identity

  cfg = detection_config()
  run = SimpleNamespace(cfg=cfg, task=Detection(3), user_data=False, user_model=False, label='')
  identity = _run_identity(run)
  assert {'detector', 'canvas', 'dataset', 'model', 'task'} <= set(identity) and 'deformable' not in identity
  assert identity['canvas']['num_digits'] == [1, 3] and 'bbox_loss_coefficient' not in identity['detector']
  mine = _run_identity(SimpleNamespace(cfg=cfg, task=Detection(3), user_data=True, user_model=True, label='Net'))
  assert not {'detector', 'canvas', 'dataset', 'model'} & set(mine) and mine['user_model'] == 'Net'

  run_file = tmp_path / 'run.json'
  run_file.write_text(json.dumps(identity))
  _check_same_run(str(tmp_path), str(run_file), identity)  # the same run resumes
  cfg.detector.bbox_loss_coefficient = 2.5  # loss weights do not change what a checkpoint holds
  _check_same_run(str(tmp_path), str(run_file), _run_identity(run))
  cfg.detector.num_queries = 6
  with pytest.raises(ConfigError, match=r"holds a checkpoint of another run \(detector.num_queries=8; this run: "
                                        r"detector.num_queries=6\)"):
    _check_same_run(str(tmp_path), str(run_file), _run_identity(run))


def test_the_detector_model_needs_the_detection_task():
  cfg = base_config()
  cfg.model = 'deformable_detr'
  with pytest.raises(ConfigError, match=r"config.model='deformable_detr' is a detector: set config.task='detection'"):
    validate(cfg, 1)
  validate(detection_config(), 1)  # and the smoke-test config is valid as it is


def test_warmup_ramps_the_learning_rate_and_clipping_bounds_the_update():
  """SGD without momentum shows the rate: the first update is -lr / warmup_steps times the (clipped) gradient."""
  cfg = base_config()
  cfg.optimizer, cfg.schedule, cfg.learning_rate = 'sgd', 'constant', 0.5
  params = {'w': jnp.zeros(2)}
  grad = {'w': jnp.asarray([3.0, 4.0])}  # norm 5

  def first_updates(**fields):
    c = set_fields(cfg.copy_and_resolve_references(), fields)
    tx = make_optimizer(c, steps_per_epoch=10, total_steps=100)
    state = tx.init(params)
    out = []
    for _ in range(3):
      update, state = tx.update(grad, state, params)
      out.append(np.asarray(update['w']))
    return out

  plain, warm, clipped = first_updates(), first_updates(warmup_steps=4), first_updates(grad_clip=1.0)
  np.testing.assert_allclose(plain[0], [-1.5, -2.0], rtol=1e-6)  # momentum starts from zero: -lr * grad
  np.testing.assert_allclose(warm[0], plain[0] / 4, rtol=1e-6)
  np.testing.assert_allclose(warm[1] / plain[1], 2 / 4, rtol=1e-6)  # the same trace, at half the rate
  np.testing.assert_allclose(warm[2] / plain[2], 3 / 4, rtol=1e-6)
  np.testing.assert_allclose(clipped[0], plain[0] / 5, rtol=1e-6)  # the gradient's norm 5 clipped to 1
  # Without clipping the state is the optimiser's own, as checkpoints written before clipping hold it.
  tree = lambda tx: jax.tree.structure(tx.init(params))
  assert tree(make_optimizer(cfg, 10, 100)) == tree(optax.sgd(0.5, momentum=0.9))


def test_the_built_in_canvases_are_the_detection_tasks_data():
  """`canvas_sources` makes what a detection run trains on: the config's canvases of the config's digits,
  train and test from disjoint digits, targets padded to the most digits a canvas holds."""
  cfg = detection_config()
  train_set, test_set = canvas_sources(cfg)
  assert len(train_set) == cfg.canvas.train_images and len(test_set) == cfg.canvas.test_images
  record = train_set[0]
  assert record['image'].shape == (cfg.canvas.size, cfg.canvas.size, 3)
  assert record['class_labels'].shape == (cfg.canvas.num_digits[1],) and record['boxes'].shape[-1] == 4
  again, _ = canvas_sources(cfg)
  np.testing.assert_array_equal(again.images, train_set.images)  # fixed by canvas.seed, not by the run's seed


@pytest.mark.slow
def test_the_command_line_trains_a_detector_on_two_seeds_and_resumes_after_sigterm(tmp_path, capsys):
  """`python -m deformjax.train --config experiments/configs/detection.py:runlocal` with two seeds trained
  together on two devices: stopped by SIGTERM after step 3 (a checkpoint is saved there), resumed to step 4, it
  ends on the parameters and COCO metrics of a run never stopped."""
  pytest.importorskip('scipy')
  pytest.importorskip('pycocotools')
  pytest.importorskip('sklearn')
  work = tmp_path / 'run'
  overrides = ['--config.steps=4', '--config.num_seeds=2', '--config.num_devices=2', '--config.checkpoint_every=2',
               '--config.progress=false']
  args = [f'--config={DETECTION_CONFIG}:runlocal', *overrides, f'--config.workdir={work}']
  with pytest.raises(SystemExit) as stopped:
    cli.main(args, on_step=at_step(3, lambda: signal.raise_signal(signal.SIGTERM)))
  assert stopped.value.code == 143
  assert 'stopped by signal at step 3; checkpoint saved in' in capsys.readouterr().err
  summary = cli.main([*args, f'--summary_json={tmp_path / "s.json"}', f'--params_out={tmp_path / "p.npz"}'])
  out = capsys.readouterr().out
  assert f'resumed from {work / "checkpoints"} at step 3' in out and 'seed 1:' in out and '| AP50 |' in out
  written = json.loads((tmp_path / 's.json').read_text())
  assert written['task'] == 'detection' and written['seeds'] == [0, 1] and written['steps'] == 4
  assert written['trained'] == 'deformable_detr d32 q8'
  assert json.loads((work / 'run.json').read_text())['detector']['num_queries'] == 8
  assert [r['step'] for r in records(work / 'metrics.jsonl') if r['split'] == 'train'] == [1, 1, 2, 2, 3, 3, 4, 4]

  straight = train(detection_config(steps=4, num_seeds=2, num_devices=2), echo=quiet)
  for i in range(2):
    assert_same_params(leaves(summary['params'], i), leaves(straight['params'], i))
  assert not np.array_equal(*(leaves(straight['params'], i)["['class_embed'][0]['bias'].value"] for i in range(2)))
  assert summary['eval'] == straight['eval']
  assert sorted(params_of(tmp_path / 'p.npz')) == sorted(leaves(summary['params']))
  for evaluation in straight['eval']:
    assert {'loss', 'AP', 'AP50', 'AP75', 'loss_ce', 'loss_bbox', 'loss_giou'} <= set(evaluation['baseline'])

  # run.json records the detector and the canvases: the workdir of this detector does not resume another
  other = detection_config(steps=4, num_seeds=2, num_devices=2, workdir=str(work))
  other.detector.num_queries = 6
  with pytest.raises(ConfigError, match=r'holds a checkpoint of another run \(detector.num_queries=8; this run: '
                                        r'detector.num_queries=6\)'):
    train(other, echo=quiet)
  # a finished run resumed evaluates again without logging its final evaluation twice; fewer steps are refused
  again = cli.main(args)
  assert again['eval'] == summary['eval']
  evaluations = [r for r in records(work / 'metrics.jsonl') if r['split'] == 'eval']
  assert [(r['step'], r['seed']) for r in evaluations] == [(4, 0), (4, 1)]
  with pytest.raises(SystemExit):
    cli.main([*args, '--config.steps=2'])
  assert 'holds a checkpoint at step 4, past the 2 steps of this run' in capsys.readouterr().err


def test_detection_sources_of_your_own_get_the_task_of_config_detector():
  """`train(cfg, model=..., sources=...)` with `config.task='detection'` and no `task=`: the task is
  `Detection.from_config(config.detector)` with the records' padded target count, the classes read from them."""
  from deformjax.data import digit_canvases
  from deformjax.detection import Detection
  from deformjax.train.loop import _data

  cfg = detection_config()
  cfg.detector.bbox_loss_coefficient, cfg.detector.two_stage = 3.0, True
  kw = dict(size=32, num_digits=(1, 4), digit_size=(8, 12), source='digits')
  sources = digit_canvases('train', 12, **kw), digit_canvases('test', 4, **kw)
  spec, task, train_src, _ = _data(cfg, sources, None)
  assert isinstance(task, Detection) and task.max_targets == 4 and task.encoder_loss
  assert dict(task.loss_config)['bbox_loss_coefficient'] == 3.0 and dict(task.loss_config)['auxiliary_loss']
  assert spec.image_shape == (32, 32, 3) and spec.num_classes == int(train_src.class_labels[
      train_src.label_mask].max()) + 1
