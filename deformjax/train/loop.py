"""The training loop: data-parallel steps, evaluation, logging, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deformjax.data.canvas import DetectionCanvases, digit_canvases
from deformjax.data.sources import DataError, DatasetSpec, RandomAccessSource, get_spec, load_source
from deformjax.detection.task import Detection
from deformjax.models.classifiers import build_model
from deformjax.models.deformable_detr import DeformableDetr
from deformjax.ops._args import is_int
from deformjax.train import feeding
from deformjax.train import mesh as mesh_lib
from deformjax.train._progress import progress_bar
from deformjax.train.checkpoint import Checkpointer
from deformjax.train.config import DETECTOR_MODEL, ConfigError, _task, model_label, validate
from deformjax.train.metrics import Accumulator
from deformjax.train.steps import Trainer, augment_arrays, host_array, make_trainer, seed_slice
from deformjax.train.task import Task, default_task, infer_task

# Added to a run's seed for the keys of its test transforms, so they are not the train augmentation's draws.
_EVAL_SEED_OFFSET = 1_000_003


class Interrupted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""


@contextlib.contextmanager
def _stop_on_signals(flag: threading.Event):
  """SIGTERM / SIGINT set `flag`; the loop saves and stops at the next step boundary."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  for s in previous:
    signal.signal(s, lambda *_: flag.set())
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def evaluate(trainer: Trainer, params: nnx.State, source: RandomAccessSource, spec: DatasetSpec,
             cfg: ml_collections.ConfigDict, mesh: Mesh, seed: int | None = None,
             model_state: nnx.State | None = None) -> dict[str, dict[str, Any]]:
  """Metrics of `params` (one seed's) on every named test set of `cfg.eval_sets`, as the trainer's task sums them.

  The test transforms are drawn from `seed` (default `cfg.seed`), as in a run of that seed alone.

  Args:
    trainer: the steps of the run (`deformjax.train.steps.make_trainer`); its `eval_step` and `task` are used.
    params: one seed's model parameters, replicated on `mesh`.
    source: the test split.
    spec: its dataset spec.
    cfg: the run's config (`eval_sets`, `eval_batch_size`, `seed`).
    mesh: the data mesh.
    seed: the seed whose test transforms are drawn; None: `cfg.seed`.
    model_state: the train state's 'model_state' of the same seed (the running BatchNorm statistics inference
      uses), for a model that has one; None for a model with parameters only.

  Returns:
    Test set name -> its metrics (the task's `Evaluator.result`).
  """
  results = {}
  seed = cfg.seed if seed is None else seed
  task = default_task(spec) if trainer.task is None else trainer.task
  layout = task.label_layout(spec)
  for name, aug in sorted(cfg.eval_sets.items()):
    evaluator = task.evaluator(spec)
    arrays = augment_arrays(aug)
    base = jax.random.PRNGKey(seed + _EVAL_SEED_OFFSET)
    for i, (local, valid) in enumerate(feeding.eval_batches(source, spec, layout, global_batch=cfg.eval_batch_size,
                                                            process_index=jax.process_index(),
                                                            process_count=jax.process_count())):
      batch = mesh_lib.global_batch(mesh, {**local, 'valid': valid})
      valid_rows = batch.pop('valid')
      sums, outputs = trainer.eval_step(params, batch, valid_rows, jax.random.fold_in(base, i), arrays, model_state)
      keep = host_array(valid_rows)
      if task.eval_outputs:
        real = functools.partial(_real_rows, keep)
        evaluator.add(jax.device_get(sums), int(keep.sum()), jax.tree.map(real, outputs), jax.tree.map(real, batch))
      else:
        evaluator.add(jax.device_get(sums), int(keep.sum()), None, None)
    results[name] = evaluator.result()
  return results


def _real_rows(keep: np.ndarray, x: jax.Array) -> np.ndarray:
  """The rows of a global batch array that are real examples, as numpy on every process."""
  return host_array(x)[keep]


def _truncate_log(path: str | None, step: int, final: bool = False) -> None:
  """Drops the records of `path` past `step` (process 0 only); with `final`, also the evaluation at `step`, which a
  resumed finished run writes again."""
  if path is None or jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    records = [(line, json.loads(line)) for line in f if line.strip()]
  again = lambda r: final and r['step'] == step and r['split'] == 'eval'
  keep = [line for line, r in records if r['step'] <= step and not again(r)]
  with open(path, 'w') as f:
    f.writelines(keep)


def _log_line(path: str | None, record: dict) -> None:
  if path is not None and jax.process_index() == 0:
    with open(path, 'a') as f:
      f.write(json.dumps(record) + '\n')


_CLASSIFICATION_COLUMNS = {'loss': '{:.4f}', 'accuracy': '{:.2%}', 'mAP': '{:.2%}'}


def format_summary(results: dict[str, dict[str, Any]], columns: dict[str, str] | None = None) -> str:
  """A Markdown table of final results: one row per test set, one column per metric.

  Args:
    results: test set name -> metrics, as `evaluate` returns them.
    columns: metric name -> its format (`str.format`), in column order (a task's `summary_columns`); None:
      loss, accuracy and, where a result has it, mAP. A metric no result has is left out.

  Returns:
    The table, one line per row.

  Example:
    >>> from deformjax.train import format_summary
    >>> print(format_summary({'baseline': {'loss': 0.25, 'accuracy': 0.9}}))
    | test set | loss | accuracy |
    |---|---|---|
    | baseline | 0.2500 | 90.00% |
  """
  columns = _CLASSIFICATION_COLUMNS if columns is None else columns
  names = [c for c in columns if any(c in r for r in results.values())]
  rows = ['| test set | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for name, r in results.items():
    cells = [columns[c].format(r[c]) if c in r else '' for c in names]
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def model_factory(cfg: ml_collections.ConfigDict, spec: DatasetSpec) -> Callable[[int], nnx.Module]:
  """`seed -> model` for the built-in model `cfg` describes on data of `spec`, its parameters drawn from `seed`."""

  if cfg.model == DETECTOR_MODEL:
    return _detector_factory(cfg, spec)

  def build(seed: int) -> nnx.Module:
    return build_model(cfg.model, in_features=spec.image_shape[-1], num_classes=spec.num_classes,
                       image_size=spec.image_shape[0], deformable=cfg.deformable, modulated=cfg.modulated,
                       conv=cfg.get('conv'), preset=cfg.get('preset', 'micro'),
                       dropout=cfg.dropout, dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(seed))

  return build


def _detector_factory(cfg: ml_collections.ConfigDict, spec: DatasetSpec) -> Callable[[int], nnx.Module]:
  """`seed -> DeformableDetr` of `cfg.detector`, with `num_labels` the classes of `spec`."""
  config = {**cfg.detector.to_dict(), 'num_labels': spec.num_classes}
  if spec.image_shape[-1] != 3:
    raise ConfigError(f'config.detector: its backbone reads 3 channels, and the images have {spec.image_shape[-1]}')

  def build(seed: int) -> nnx.Module:
    try:
      return DeformableDetr(config, dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(seed))
    except ValueError as e:
      raise ConfigError(f'config.detector: {e}') from None

  return build


def user_model_factory(model: Callable[[nnx.Rngs], nnx.Module] | nnx.Module,
                       num_seeds: int = 1) -> Callable[[int], nnx.Module]:
  """`seed -> model` for a model of your own.

  Args:
    model: a callable `nnx.Rngs -> nnx.Module` (called with `nnx.Rngs(seed)` once per seed; e.g. the class, or
      `lambda rngs: MyNet(7, rngs=rngs)`), or a built `nnx.Module` (its own parameters are the start; one seed
      only).
    num_seeds: the seeds the run trains.

  Returns:
    The factory `make_trainer` takes.

  Raises:
    ConfigError: a built module with `num_seeds > 1`, a callable that does not build an `nnx.Module`, or
      neither.
  """
  if isinstance(model, nnx.Module):
    if num_seeds > 1:
      raise ConfigError(f'config.num_seeds={num_seeds} needs a model per seed: pass model= a callable '
                        'rngs -> nnx.Module (e.g. lambda rngs: MyNet(rngs=rngs)), not a built module')
    return lambda seed: model
  if not callable(model):
    raise ConfigError(f'model= must be an nnx.Module or a callable nnx.Rngs -> nnx.Module, got '
                      f'{type(model).__name__}')

  def build(seed: int) -> nnx.Module:
    built = model(nnx.Rngs(seed))
    if not isinstance(built, nnx.Module):
      raise ConfigError(f'model(rngs) must return an nnx.Module, got {type(built).__name__}')
    return built

  return build


class _Progress:
  """One run's progress bar (rich) on stderr: steps done of all, elapsed, ETA, the last logged loss/accuracy."""

  def __init__(self, description: str, total: int, done: int):
    self.progress = progress_bar(metrics=True)
    self.task = self.progress.add_task(description, total=total, completed=done, metrics='')
    self.progress.start()

  def advance(self, metrics: str | None = None) -> None:
    fields: dict[str, Any] = {} if metrics is None else {'metrics': metrics}
    self.progress.update(self.task, advance=1, **fields)

  def close(self) -> None:
    self.progress.stop()


@dataclasses.dataclass
class _Run:
  """What the set-up phase decides: the data, the compiled steps, the state, how batches reach the devices."""
  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  spec: DatasetSpec
  test_src: RandomAccessSource
  steps_per_epoch: int
  total_steps: int
  seeds: list
  trainer: Trainer
  state: dict
  train_aug: dict
  split: feeding.DeviceSplit | None  # the train split on the devices, or
  iterator: feeding.Prefetcher | None  # the host-fed batches
  label: str = ''  # what is trained, as the progress bar names it
  user_model: bool = False  # a model of your own (run.json records its class name), not cfg.model
  user_data: bool = False  # sources of your own, not cfg.dataset

  @property
  def multi(self) -> bool:
    return len(self.seeds) > 1

  @property
  def task(self) -> Task:
    """What is trained (`make_trainer` always gives the trainer its task)."""
    assert self.trainer.task is not None
    return self.trainer.task

  def evaluate(self, state: dict) -> dict | list[dict]:
    """Metrics of the model in `state` on every test set (a list, one per seed, when seeds train together)."""
    model_state = state.get('model_state')
    if not self.multi:
      return evaluate(self.trainer, state['params'], self.test_src, self.spec, self.cfg, self.mesh,
                      model_state=model_state)
    return [evaluate(self.trainer, seed_slice(state['params'], i), self.test_src, self.spec, self.cfg, self.mesh,
                     seed=s, model_state=None if model_state is None else seed_slice(model_state, i))
            for i, s in enumerate(self.seeds)]


def _data(cfg: ml_collections.ConfigDict, sources: tuple[RandomAccessSource, RandomAccessSource] | None,
          task: Task | None) -> tuple[DatasetSpec, Task, RandomAccessSource, RandomAccessSource]:
  """`(spec, task, train, test)`: the built-in dataset `cfg.dataset`, or `sources` described from their own data."""
  if sources is None and _task(cfg) == 'detection':
    return _canvases(cfg, task)
  if sources is None:
    spec = get_spec(cfg.dataset)
    train_src = load_source(cfg.dataset, spec.splits[0], cfg.data_dir)
    test_src = load_source(cfg.dataset, spec.splits[1], cfg.data_dir)
    return spec, default_task(spec) if task is None else task, train_src, test_src
  if not (isinstance(sources, (tuple, list)) and len(sources) == 2):
    raise ConfigError(f'sources= must be (train, test), two sources (deformjax.data.ArraySource), got '
                      f'{type(sources).__name__}')
  train_src, test_src = (_as_source(s, what) for s, what in zip(sources, ('train', 'test')))
  if task is None:
    task = _detection_task(cfg, train_src) if _task(cfg) == 'detection' else infer_task(train_src)
  try:
    spec = task.describe(train_src, test_src, cfg.get('num_classes', 0))
  except ValueError as e:
    raise DataError(f'sources: {e}') from None
  return spec, task, train_src, test_src


def _detection_task(cfg: ml_collections.ConfigDict, train_src: RandomAccessSource) -> Detection:
  """The detection task of `cfg.detector`, its targets padded as the records' are."""
  try:
    max_targets = len(train_src[0]['class_labels'])
  except (KeyError, TypeError, IndexError):
    raise DataError("sources: config.task='detection' needs records with image, class_labels, boxes and "
                    'label_mask (as deformjax.data.digit_canvases makes them)') from None
  return Detection.from_config(cfg.detector.to_dict(), max_targets)


def canvas_sources(cfg: ml_collections.ConfigDict) -> tuple[DetectionCanvases, DetectionCanvases]:
  """`(train, test)`: the detection data of `config.task='detection'`, `cfg.dataset`'s digits on canvases.

  Args:
    cfg: a config with `dataset` ('digits' or 'mnist5k') and `canvas` (see `deformjax.train.config.canvas_config`).

  Returns:
    The train and test canvases (`deformjax.data.digit_canvases`), made from disjoint digits.
  """
  c = cfg.canvas
  kw = dict(size=c.size, num_digits=tuple(c.num_digits), digit_size=tuple(c.digit_size), source=cfg.dataset,
            max_overlap=c.max_overlap, seed=c.seed)
  return digit_canvases('train', c.train_images, **kw), digit_canvases('test', c.test_images, **kw)


def _canvases(cfg: ml_collections.ConfigDict,
              task: Task | None) -> tuple[DatasetSpec, Task, RandomAccessSource, RandomAccessSource]:
  """The built-in detection data as `_data` returns it: spec, task, train and test canvases."""
  train_src, test_src = canvas_sources(cfg)
  task = _detection_task(cfg, train_src) if task is None else task
  digits = get_spec(cfg.dataset)
  spec = task.describe(train_src, test_src, digits.num_classes)
  return dataclasses.replace(spec, name=f'{cfg.dataset} canvases', class_names=digits.class_names), task, \
      train_src, test_src


def _as_source(source: Any, what: str) -> RandomAccessSource:
  """A source as given, or `(images, labels)` arrays wrapped in an `ArraySource`."""
  if isinstance(source, (tuple, list)) and len(source) == 2:
    from deformjax.data.sources import ArraySource

    return ArraySource(np.asarray(source[0]), np.asarray(source[1]))
  if not (hasattr(source, '__len__') and hasattr(source, '__getitem__')):
    raise ConfigError(f'sources: the {what} split must be a random-access source (len and [i]) or an (images, '
                      f'labels) pair, got {type(source).__name__}')
  return source


def _set_up(cfg: ml_collections.ConfigDict, sources: tuple[RandomAccessSource, RandomAccessSource] | None,
            model: Callable[[nnx.Rngs], nnx.Module] | nnx.Module | None = None, task: Task | None = None) -> _Run:
  """Phase 1: validates `cfg`, builds the mesh, loads the data, checks and compiles the steps, draws the state."""
  if not is_int(cfg.num_devices) or cfg.num_devices < 0:
    raise ConfigError(f'config.num_devices must be 0 (all devices) or a positive int, got {cfg.num_devices!r}')
  try:
    mesh = mesh_lib.data_mesh(int(cfg.num_devices))
  except ValueError as e:
    raise ConfigError(f'config.num_devices: {e}') from None
  validate(cfg, mesh.size, dataset=sources is None, model=model is None)
  spec, task, train_src, test_src = _data(cfg, sources, task)
  steps_per_epoch = len(train_src) // cfg.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size={cfg.batch_size} exceeds the {len(train_src)} training examples')
  total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
  seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
  resident = cfg.data_placement == 'device' or (
      cfg.data_placement == 'auto' and feeding.fits_on_device(spec, len(train_src)))
  if len(seeds) > 1 and not resident:
    raise ConfigError(f'config.num_seeds={cfg.num_seeds} needs the train split on the devices, and '
                      f'{len(train_src)} examples exceed feeding.DEVICE_DATA_MAX_BYTES: use '
                      "data_placement='device' if it fits, or num_seeds=1")
  model_fn = model_factory(cfg, spec) if model is None else user_model_factory(model, len(seeds))
  trainer = make_trainer(model_fn, cfg, spec, mesh, steps_per_epoch, total_steps, num_seeds=len(seeds),
                         seed_batching=cfg.seed_batching, task=task)
  label = model_label(cfg) if model is None else trainer.model_name
  layout = task.label_layout(spec)
  split = iterator = None
  if resident:
    split = feeding.DeviceSplit.place(*feeding.read_split(train_src, spec, layout), mesh)
  else:
    iterator = feeding.Prefetcher(
        feeding.host_batches(train_src, spec, layout, global_batch=cfg.batch_size, seed=cfg.seed,
                             process_index=jax.process_index(), process_count=jax.process_count()),
        put=lambda local: mesh_lib.global_batch(mesh, local))
  return _Run(cfg, mesh, spec, test_src, steps_per_epoch, total_steps, seeds, trainer, trainer.init_state(seeds),
              augment_arrays(cfg.train_augment), split, iterator, label, model is not None, sources is not None)


def _restore(run: _Run, echo: Callable[[str], object]) -> tuple[Checkpointer | None, str | None, int]:
  """Phase 2: opens `cfg.workdir` and resumes from its latest checkpoint; returns (checkpointer, metrics path, step).

  A workdir of another run (run.json) or a checkpoint this state cannot take is refused by name; the metrics a
  killed run wrote after its last checkpoint are dropped, to be written again.
  """
  cfg, workdir = run.cfg, run.cfg.workdir
  if not workdir:
    return None, None, 0
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=cfg.keep_checkpoints)
  run_file = os.path.join(workdir, 'run.json')
  identity = _run_identity(run)
  start = 0
  if ckpt.latest_step() is not None:
    _check_same_run(workdir, run_file, identity)
    try:
      run.state = ckpt.restore(run.state, run.iterator)
    except (ValueError, KeyError, TypeError) as e:  # orbax: the saved tree is not this run's state
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(f'config.workdir={workdir!r} holds a checkpoint this run cannot restore ({first}); '
                        'use another workdir, or delete it to start over') from None
    start = int(np.asarray(jax.device_get(run.state['step'])).reshape(-1)[0])
    if start > run.total_steps:
      raise ConfigError(f'config.workdir={workdir!r} holds a checkpoint at step {start}, past the {run.total_steps} '
                        'steps of this run: train for more steps, or use another workdir')
    _truncate_log(metrics_path, start, final=start == run.total_steps)
    if jax.process_index() == 0:
      echo(f'resumed from {ckpt.directory} at step {start}')
  if jax.process_index() == 0:
    with open(run_file, 'w') as f:
      json.dump(identity, f, indent=1)
  return ckpt, metrics_path, start


@dataclasses.dataclass
class _History:
  """What the step loop records: the last and every logged train window, in-loop evaluations, timings."""
  last_train: dict | list = dataclasses.field(default_factory=dict)
  train: list = dataclasses.field(default_factory=list)
  eval: list = dataclasses.field(default_factory=list)
  first_step_seconds: float | None = None
  seconds_per_step: float | None = None
  started: float = dataclasses.field(default_factory=time.perf_counter)  # when this process began its steps


class _EpochOrder:
  """The order the device-resident train split is read in: drawn once per epoch, one permutation per seed."""

  def __init__(self, run: _Run):
    self.run = run
    self.epoch: int | None = None
    self.order: jax.Array | None = None

  def at(self, step: int) -> jax.Array:
    """`[examples]` (or `[num_seeds, examples]` when seeds train together): the order of `step`'s epoch."""
    epoch = step // self.run.steps_per_epoch
    if self.order is None or epoch != self.epoch:
      assert self.run.split is not None  # the split is on the devices
      orders = [feeding.epoch_permutation(self.run.mesh, s, epoch, self.run.split.size) for s in self.run.seeds]
      self.epoch, self.order = epoch, jnp.stack(orders) if self.run.multi else orders[0]
    return self.order


def _advance(run: _Run, order: _EpochOrder, step: int) -> None:
  """One train step on `run.state`: the batch gathered on the devices, or the next host-fed batch."""
  if run.split is not None:
    run.state, _ = run.trainer.resident_step(run.state, run.split.images, run.split.labels, order.at(step),
                                             run.train_aug)
  else:
    assert run.iterator is not None  # host-fed
    run.state, _ = run.trainer.train_step(run.state, next(run.iterator), run.train_aug)


def _eval_due(run: _Run, done: int) -> bool:
  """Whether an in-loop evaluation follows step `done` (an epoch boundary every `eval_every_epochs`, not the last
  step, which the final evaluation covers)."""
  every = run.cfg.eval_every_epochs
  epoch, within = divmod(done, run.steps_per_epoch)
  return bool(every) and within == 0 and epoch % every == 0 and done != run.total_steps


def _checkpoint_due(run: _Run, done: int) -> bool:
  """Whether a checkpoint follows step `done`: every `checkpoint_every` steps (or epoch when 0), and the last."""
  every = run.cfg.checkpoint_every
  return done == run.total_steps or done % (every or run.steps_per_epoch) == 0


def _evaluate_in_loop(run: _Run, history: _History, metrics_path: str | None, done: int) -> float:
  """Evaluates after step `done`, records and logs it; returns the seconds it took (kept out of the step timing)."""
  t0 = time.perf_counter()
  res = run.evaluate(run.state)
  seconds = time.perf_counter() - t0
  history.eval.append({'step': done, 'epoch': done // run.steps_per_epoch,
                       # wall time since this process's first step, earlier evaluations included
                       'seconds': round(t0 - history.started, 1),
                       **({'seeds': res} if isinstance(res, list) else res)})
  _log_eval(metrics_path, done, run.seeds, res)
  return seconds


def _stop(run: _Run, ckpt: Checkpointer | None, done: int, last_saved: int) -> Interrupted:
  """On a stop signal: step `done` saved (unless it already was) and the save finished; the error to raise."""
  if ckpt is None:
    return Interrupted(f'stopped by signal at step {done}')
  if last_saved != done:  # else this step's own save is under way: waiting for it is enough
    ckpt.save(done, run.state, run.iterator, force=True)
  ckpt.wait()
  return Interrupted(f'stopped by signal at step {done}; checkpoint saved in {ckpt.directory}')


def _step_loop(run: _Run, ckpt: Checkpointer | None, metrics_path: str | None, start: int,
               on_step: Callable[[], object] | None, bar: _Progress | None) -> _History:
  """Phase 3: steps `start` .. `total_steps`, logging every `log_every`, evaluating every `eval_every_epochs`,
  checkpointing every `checkpoint_every` (or epoch); on SIGTERM/SIGINT saves and raises `Interrupted`."""
  history, order, stop = _History(), _EpochOrder(run), threading.Event()
  t_timed, eval_seconds, last_saved = None, 0.0, start
  with _stop_on_signals(stop):
    for step in range(start, run.total_steps):
      t0 = time.perf_counter()
      _advance(run, order, step)
      done = step + 1
      if done == start + 1:
        jax.block_until_ready(run.state)  # the first step compiles: keep it out of the timing
        history.first_step_seconds = time.perf_counter() - t0
        t_timed = time.perf_counter()
      logged = done % run.cfg.log_every == 0 or done == run.total_steps
      postfix = _log_train(run, history, metrics_path, done) if logged else None
      if bar is not None:
        bar.advance(postfix)
      if on_step is not None:
        on_step()
      if _eval_due(run, done):
        eval_seconds += _evaluate_in_loop(run, history, metrics_path, done)
      if ckpt is not None and _checkpoint_due(run, done):
        ckpt.save(done, run.state, run.iterator)
        last_saved = done
      if stop.is_set():
        raise _stop(run, ckpt, done, last_saved)
  jax.block_until_ready(run.state)
  timed_steps = run.total_steps - start - 1
  if t_timed is not None and timed_steps > 0:
    # Wall time per step after the first (compiling) one, data loading included, evaluation excluded.
    history.seconds_per_step = (time.perf_counter() - t_timed - eval_seconds) / timed_steps
  return history


def _log_train(run: _Run, history: _History, metrics_path: str | None, done: int) -> str:
  """Reads the summed train metrics of the window (the only read of step results), logs them, resets the sums."""
  sums = jax.device_get(run.state['metrics'])
  per_seed = [_train_metrics(seed_slice(sums, i) if run.multi else sums) for i in range(len(run.seeds))]
  history.last_train = per_seed if run.multi else per_seed[0]
  run.state = {**run.state, 'metrics': jax.device_put(jax.tree.map(jnp.zeros_like, run.state['metrics']),
                                                      mesh_lib.replicated(run.mesh))}
  history.train.append({'step': done, **({'seeds': per_seed} if run.multi else per_seed[0])})
  for seed, metrics in zip(run.seeds, per_seed):
    _log_line(metrics_path, {'step': done, 'split': 'train', **({'seed': seed} if run.multi else {}), **metrics})
  shown = [k for k in ('loss', 'accuracy') if all(k in m for m in per_seed)]
  return ' '.join(f"{k.replace('accuracy', 'acc')} {np.mean([m[k] for m in per_seed]):.{4 if k == 'loss' else 3}f}"
                  for k in shown)


def _summary(run: _Run, history: _History, final: dict | list[dict]) -> dict:
  """Phase 5: the summary dict `train` returns."""
  params, multi = run.state['params'], run.multi
  return {
      'config': run.cfg.to_dict(),
      'seeds': run.seeds,
      'steps': run.total_steps,
      'steps_per_epoch': run.steps_per_epoch,
      'trained': run.label,
      'task': run.task.name,
      'data_placement': 'device' if run.split is not None else 'host',
      'devices': run.mesh.size,
      'processes': jax.process_count(),
      'train': history.last_train,
      'train_history': history.train,
      'eval': final,
      'eval_history': history.eval,
      'first_step_seconds': history.first_step_seconds,
      'seconds_per_step': history.seconds_per_step,
      'params': params,
      'model_state': run.state.get('model_state'),  # None for a model with parameters only
      'param_checksum': ([param_checksum(seed_slice(params, i)) for i in range(len(run.seeds))] if multi
                         else param_checksum(params)),
  }


def train(cfg: ml_collections.ConfigDict, *, model: Callable[[nnx.Rngs], nnx.Module] | nnx.Module | None = None,
          sources: tuple[RandomAccessSource, RandomAccessSource] | None = None, task: Task | None = None,
          echo: Callable[[str], object] = print, on_step: Callable[[], object] | None = None) -> dict[str, Any]:
  """Trains per `cfg` (see `deformjax.train.config.base_config`); returns a summary dict.

  Resumes from the latest checkpoint in `cfg.workdir` when there is one. On
  SIGTERM/SIGINT it saves a checkpoint and raises `Interrupted`.

  Args:
    cfg: the run's config; `model`, `sources` and `task` replace the parts of it they stand for.
    model: a model of your own instead of `cfg.model`: a callable `nnx.Rngs -> nnx.Module` (the class itself,
      or e.g. `lambda rngs: MyNet(7, rngs=rngs)`), called with `nnx.Rngs(seed)` for each seed, or a built
      `nnx.Module` (one seed). It is called on images `[B, H, W, C]` and returns what the task's loss takes
      (classification: logits `[B, K]`); a `__call__` without a `train` keyword is switched with
      `model.train()` / `model.eval()`.
    sources: `(train, test)` instead of loading `cfg.dataset`: random-access sources (e.g.
      `deformjax.data.ArraySource`) or `(images, labels)` array pairs. Image shape, channels and classes are
      read from the data itself (`config.num_classes` > 0 fixes the count), single-label (int labels `[N]`)
      or multi-label (multi-hot `[N, K]`).
    task: what is trained (`deformjax.train.task.Task`: loss, metrics, evaluation, label layout); None:
      classification, single- or multi-label as the labels are.
    echo: where the run's lines go (resume notice, the final table).
    on_step: called with no arguments after every step (e.g. a progress bar over several runs).

  Returns:
    The summary: 'params' the trained parameters and 'model_state' the model's other variables (the running
    BatchNorm statistics, a model's RNG counts; None for a model with parameters only), so
    `nnx.update(model, summary['params'])` puts them in a model built the same way; 'train' and 'eval' the
    last train window's and the final test metrics; 'train_history', 'eval_history', timings and
    'param_checksum'.

  Raises:
    ConfigError: a config value, a model or data that cannot train, one line naming it (a model output that
      does not fit the labels: before the first step).
    DataError: data that cannot be read or described.
    Interrupted: SIGTERM / SIGINT, after saving a checkpoint.

  With `cfg.num_seeds > 1` the seeds `cfg.seed, cfg.seed + 1, ...` train
  together and the summary's 'train', 'eval', 'eval_history' entries and
  'param_checksum' are lists with one entry per seed (in 'seeds' order),
  'params' (and 'model_state') have a leading seed axis, and metrics.jsonl lines carry a 'seed'.
  'seconds_per_step' is the time of one step of all seeds together.

  The phases: set-up (`_set_up`), restore (`_restore`), the step loop
  (`_step_loop`), the final evaluation, the summary (`_summary`).
  """
  run = _set_up(cfg, sources, model, task)
  ckpt, metrics_path, start = _restore(run, echo)
  main = jax.process_index() == 0
  bar = None
  columns = dict(run.task.summary_columns)
  try:
    if cfg.progress and main:
      bar = _Progress(f'{run.spec.name} {run.label}' + (f' ({len(run.seeds)} seeds)' if run.multi else ''),
                      run.total_steps, start)
    history = _step_loop(run, ckpt, metrics_path, start, on_step, bar)
    if bar is not None:
      bar.close()
      bar = None
    final = run.evaluate(run.state)  # phase 4
    _log_eval(metrics_path, run.total_steps, run.seeds, final)
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
  if main:
    if isinstance(final, list):  # one result per seed
      for seed, res in zip(run.seeds, final):
        echo(f'seed {seed}:\n' + format_summary(res, columns))
    else:
      echo(format_summary(final, columns))
  return _summary(run, history, final)


# The config fields that decide what a checkpoint holds and whose run it is; a workdir's run.json records them, and
# a resume with other values is refused: those of every run, of the built-in data, of the built-in models.
_RUN_FIELDS = ('dtype', 'optimizer', 'grad_clip', 'seed', 'num_seeds')
_DATA_FIELDS = {'classification': ('dataset',), 'detection': ('dataset', 'canvas')}
_MODEL_FIELDS = {'classification': ('model', 'preset', 'deformable', 'modulated', 'conv'),
                 'detection': ('model', 'detector')}


def _run_identity(run: _Run) -> dict[str, Any]:
  """What run.json records of `run`, as JSON reads it back (tuples as lists, groups as dicts): the fields of the
  data and model it trains, not those that `sources=` / `model=` replaced; of a detector, not its loss weights."""
  cfg, task = run.cfg, _task(run.cfg)
  fields = _RUN_FIELDS + (() if run.user_data else _DATA_FIELDS[task]) + (() if run.user_model else
                                                                          _MODEL_FIELDS[task])
  identity = {k: cfg.get(k) for k in fields}
  identity = {k: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for k, v in identity.items()}
  if 'detector' in identity:
    identity['detector'] = {k: v for k, v in identity['detector'].items() if k not in Detection.LOSS_KEYS}
  identity.update({'task': run.task.name, **({'user_model': run.label} if run.user_model else {})})
  return json.loads(json.dumps(identity))


def _flat(record: dict, prefix: str = '') -> dict[str, Any]:
  """`{'detector': {'d_model': 64}}` -> `{'detector.d_model': 64}`."""
  out: dict[str, Any] = {}
  for k, v in record.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def _check_same_run(workdir: str, run_file: str, identity: dict) -> None:
  """Refuses a workdir whose run.json records another run, naming the fields that differ."""
  if not os.path.exists(run_file):
    return  # a checkpoint from before run.json existed: the restore itself checks the tree
  with open(run_file) as f:
    saved = json.load(f)
  recorded = set(saved)  # a field run.json lacks (written before it was recorded) is not compared
  saved, wanted = _flat({k: v for k, v in saved.items() if k in identity}), _flat(identity)
  differ = sorted(k for k in set(saved) | set(wanted) if k.split('.')[0] in recorded and saved.get(k) != wanted.get(k))
  if differ:
    held = ', '.join(f'{k}={saved.get(k)!r}' for k in differ)
    this = ', '.join(f'{k}={wanted.get(k)!r}' for k in differ)
    raise ConfigError(f'config.workdir={workdir!r} holds a checkpoint of another run ({held}; this run: {this}); '
                      'use another workdir, or delete it to start over')


def _train_metrics(sums: dict[str, np.ndarray]) -> dict:
  acc = Accumulator()
  acc.add({k: v for k, v in sums.items() if k != 'count'}, float(sums['count']))
  return acc.result()


def _log_eval(path: str | None, step: int, seeds: list[int], results: dict | list[dict]) -> None:
  if isinstance(results, dict):  # one seed
    _log_line(path, {'step': step, 'split': 'eval', **results})
  else:
    for seed, res in zip(seeds, results):
      _log_line(path, {'step': step, 'split': 'eval', 'seed': seed, **res})


def param_checksum(params: Any) -> float:
  """A float that changes when any parameter changes (for tests and logs)."""
  # Replicated arrays of a multi-process run are not fully addressable: read the local copy.
  local = lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x, np.float64)
  return float(sum(np.sum(local(x) * (i + 1)) for i, x in enumerate(jax.tree.leaves(params))))


__all__ = ['ConfigError', 'DataError', 'Interrupted', 'canvas_sources', 'evaluate', 'format_summary', 'model_factory',
           'param_checksum', 'train', 'user_model_factory']
