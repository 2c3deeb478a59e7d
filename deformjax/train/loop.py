"""The training loop: data-parallel steps, evaluation, logging, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
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

from deformjax.data.loader import eval_batches, train_iterator
from deformjax.data.sources import DataError, DatasetSpec, RandomAccessSource, get_spec, load_source
from deformjax.models.classifiers import build_model
from deformjax.ops._args import is_int
from deformjax.train import feeding
from deformjax.train import mesh as mesh_lib
from deformjax.train._progress import progress_bar
from deformjax.train.checkpoint import Checkpointer
from deformjax.train.config import ConfigError, validate
from deformjax.train.metrics import Accumulator
from deformjax.train.steps import Trainer, augment_arrays, host_array, make_trainer, seed_slice

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
  """Metrics of `params` (one seed's) on every named test set of `cfg.eval_sets`.

  The test transforms are drawn from `seed` (default `cfg.seed`), as in a run of that seed alone.

  Args:
    trainer: the steps of the run (`deformjax.train.steps.make_trainer`); its `eval_step` is used.
    params: one seed's model parameters, replicated on `mesh`.
    source: the test split.
    spec: its dataset spec.
    cfg: the run's config (`eval_sets`, `eval_batch_size`, `seed`).
    mesh: the data mesh.
    seed: the seed whose test transforms are drawn; None: `cfg.seed`.
    model_state: the train state's 'model_state' of the same seed (the running BatchNorm statistics inference
      uses), for a model that has one; None for a model with parameters only.

  Returns:
    Test set name -> its metrics (as `deformjax.train.metrics.Accumulator.result` gives them).
  """
  results = {}
  seed = cfg.seed if seed is None else seed
  for name, aug in sorted(cfg.eval_sets.items()):
    acc = Accumulator()
    arrays = augment_arrays(aug)
    base = jax.random.PRNGKey(seed + _EVAL_SEED_OFFSET)
    for i, (local, valid) in enumerate(eval_batches(source, spec, global_batch=cfg.eval_batch_size,
                                                    process_index=jax.process_index(),
                                                    process_count=jax.process_count())):
      batch = mesh_lib.global_batch(mesh, {**local, 'valid': valid})
      sums, logits = trainer.eval_step(params, {'image': batch['image'], 'label': batch['label']}, batch['valid'],
                                       jax.random.fold_in(base, i), arrays, model_state)
      if spec.multilabel:
        keep = host_array(batch['valid'])
        acc.add(sums, keep.sum(), host_array(logits)[keep], host_array(batch['label'])[keep])
      else:
        acc.add(sums, int(host_array(batch['valid']).sum()))
    results[name] = acc.result(spec.class_names if spec.multilabel else ())
  return results


def _truncate_log(path: str | None, step: int) -> None:
  """Drops the records of `path` past `step` (process 0 only)."""
  if path is None or jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(keep)


def _log_line(path: str | None, record: dict) -> None:
  if path is not None and jax.process_index() == 0:
    with open(path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def format_summary(results: dict[str, dict[str, Any]]) -> str:
  """A Markdown table of final results: one row per test set with its loss, accuracy and (multi-label) mAP.

  Args:
    results: test set name -> metrics, as `evaluate` returns them.

  Returns:
    The table, one line per row.

  Example:
    >>> from deformjax.train import format_summary
    >>> print(format_summary({'baseline': {'loss': 0.25, 'accuracy': 0.9}}))
    | test set | loss | accuracy |
    |---|---|---|
    | baseline | 0.2500 | 90.00% |
  """
  rows = ['| test set | loss | accuracy |' + (' mAP |' if any('mAP' in r for r in results.values()) else ''),
          '|---|---|---|' + ('---|' if any('mAP' in r for r in results.values()) else '')]
  for name, r in results.items():
    rows.append(f"| {name} | {r['loss']:.4f} | {100 * r['accuracy']:.2f}% |"
                + (f" {100 * r['mAP']:.2f}% |" if 'mAP' in r else ''))
  return '\n'.join(rows)


def model_factory(cfg: ml_collections.ConfigDict, spec: DatasetSpec) -> Callable[[int], nnx.Module]:
  """`seed -> model` for the model `cfg` describes on data of `spec`, its parameters drawn from `seed`."""

  def build(seed: int) -> nnx.Module:
    return build_model(cfg.model, in_features=spec.image_shape[-1], num_classes=spec.num_classes,
                       image_size=spec.image_shape[0], deformable=cfg.deformable, modulated=cfg.modulated,
                       conv=cfg.get('conv'), preset=cfg.get('preset', 'micro'),
                       dropout=cfg.dropout, dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(seed))

  return build


class _Progress:
  """One run's progress bar (rich) on stderr: steps done of all, elapsed, ETA, the last logged loss/accuracy."""

  def __init__(self, description: str, total: int, done: int):
    self.progress = progress_bar(metrics=True)
    self.task = self.progress.add_task(description, total=total, completed=done, metrics='')
    self.progress.start()

  def advance(self, metrics: str | None = None) -> None:
    self.progress.update(self.task, advance=1, **({} if metrics is None else {'metrics': metrics}))

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

  @property
  def multi(self) -> bool:
    return len(self.seeds) > 1

  def evaluate(self, state: dict) -> dict | list[dict]:
    """Metrics of the model in `state` on every test set (a list, one per seed, when seeds train together)."""
    model_state = state.get('model_state')
    if not self.multi:
      return evaluate(self.trainer, state['params'], self.test_src, self.spec, self.cfg, self.mesh,
                      model_state=model_state)
    return [evaluate(self.trainer, seed_slice(state['params'], i), self.test_src, self.spec, self.cfg, self.mesh,
                     seed=s, model_state=None if model_state is None else seed_slice(model_state, i))
            for i, s in enumerate(self.seeds)]


def _set_up(cfg: ml_collections.ConfigDict, sources: tuple[RandomAccessSource, RandomAccessSource] | None) -> _Run:
  """Phase 1: validates `cfg`, builds the mesh, loads the data, compiles the steps, draws the initial state."""
  if not is_int(cfg.num_devices) or cfg.num_devices < 0:
    raise ConfigError(f'config.num_devices must be 0 (all devices) or a positive int, got {cfg.num_devices!r}')
  try:
    mesh = mesh_lib.data_mesh(cfg.num_devices)
  except ValueError as e:
    raise ConfigError(f'config.num_devices: {e}') from None
  validate(cfg, mesh.size)
  spec = get_spec(cfg.dataset)
  if sources is None:
    train_src = load_source(cfg.dataset, spec.splits[0], cfg.data_dir)
    test_src = load_source(cfg.dataset, spec.splits[1], cfg.data_dir)
  else:
    train_src, test_src = sources
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
  trainer = make_trainer(model_factory(cfg, spec), cfg, spec, mesh, steps_per_epoch, total_steps, num_seeds=len(seeds),
                         seed_batching=cfg.seed_batching)
  split = iterator = None
  if resident:
    split = feeding.DeviceSplit.place(*feeding.read_split(train_src, spec), mesh)
  else:
    iterator = feeding.Prefetcher(
        train_iterator(train_src, spec, global_batch=cfg.batch_size, seed=cfg.seed,
                       process_index=jax.process_index(), process_count=jax.process_count()),
        put=lambda local: mesh_lib.global_batch(mesh, local))
  return _Run(cfg, mesh, spec, test_src, steps_per_epoch, total_steps, seeds, trainer, trainer.init_state(seeds),
              augment_arrays(cfg.train_augment), split, iterator)


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
  identity = {k: cfg.get(k) for k in _RUN_FIELDS}
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
    _truncate_log(metrics_path, start)
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


class _EpochOrder:
  """The order the device-resident train split is read in: drawn once per epoch, one permutation per seed."""

  def __init__(self, run: _Run):
    self.run, self.epoch, self.order = run, None, None

  def at(self, step: int) -> jax.Array:
    """`[examples]` (or `[num_seeds, examples]` when seeds train together): the order of `step`'s epoch."""
    epoch = step // self.run.steps_per_epoch
    if epoch != self.epoch:
      orders = [feeding.epoch_permutation(self.run.mesh, s, epoch, self.run.split.size) for s in self.run.seeds]
      self.epoch, self.order = epoch, jnp.stack(orders) if self.run.multi else orders[0]
    return self.order


def _advance(run: _Run, order: _EpochOrder, step: int) -> None:
  """One train step on `run.state`: the batch gathered on the devices, or the next host-fed batch."""
  if run.split is not None:
    run.state, _ = run.trainer.resident_step(run.state, run.split.images, run.split.labels, order.at(step),
                                             run.train_aug)
  else:
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
  history.eval.append({'step': done, 'epoch': done // run.steps_per_epoch, **({'seeds': res} if run.multi else res)})
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
  history.train.append({'step': done, **({'seeds': per_seed} if run.multi else history.last_train)})
  for seed, metrics in zip(run.seeds, per_seed):
    _log_line(metrics_path, {'step': done, 'split': 'train', **({'seed': seed} if run.multi else {}), **metrics})
  return (f"loss {np.mean([m['loss'] for m in per_seed]):.4f} "
          f"acc {np.mean([m['accuracy'] for m in per_seed]):.3f}")


def _summary(run: _Run, history: _History, final: dict | list[dict]) -> dict:
  """Phase 5: the summary dict `train` returns."""
  params, multi = run.state['params'], run.multi
  return {
      'config': run.cfg.to_dict(),
      'seeds': run.seeds,
      'steps': run.total_steps,
      'steps_per_epoch': run.steps_per_epoch,
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


def train(cfg: ml_collections.ConfigDict, *, echo: Callable[[str], object] = print,
          sources: tuple[RandomAccessSource, RandomAccessSource] | None = None,
          on_step: Callable[[], object] | None = None) -> dict[str, Any]:
  """Trains per `cfg` (see `deformjax.train.config.base_config`); returns a summary dict.

  Resumes from the latest checkpoint in `cfg.workdir` when there is one. On
  SIGTERM/SIGINT it saves a checkpoint and raises `Interrupted`.

  `sources`: optional `(train, test)` random-access sources (e.g.
  `deformjax.data.ArraySource` over your own arrays) used instead of loading
  `cfg.dataset`, whose spec (image shape, classes) they must match.
  `on_step`: optional callable, called with no arguments after every step
  (e.g. a progress bar over several runs).

  The summary's 'params' are the trained parameters and 'model_state' the
  model's other variables (the running BatchNorm statistics of the InternImage
  models; None for a model with parameters only).

  With `cfg.num_seeds > 1` the seeds `cfg.seed, cfg.seed + 1, ...` train
  together and the summary's 'train', 'eval', 'eval_history' entries and
  'param_checksum' are lists with one entry per seed (in 'seeds' order),
  'params' (and 'model_state') have a leading seed axis, and metrics.jsonl lines carry a 'seed'.
  'seconds_per_step' is the time of one step of all seeds together.

  The phases: set-up (`_set_up`), restore (`_restore`), the step loop
  (`_step_loop`), the final evaluation, the summary (`_summary`).
  """
  run = _set_up(cfg, sources)
  ckpt, metrics_path, start = _restore(run, echo)
  main = jax.process_index() == 0
  bar = None
  try:
    if cfg.progress and main:
      bar = _Progress(f'{cfg.dataset}/{cfg.model}/deformable={cfg.deformable}'
                      + (f'/{len(run.seeds)} seeds' if run.multi else ''), run.total_steps, start)
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
    if run.multi:
      for seed, res in zip(run.seeds, final):
        echo(f'seed {seed}:\n' + format_summary(res))
    else:
      echo(format_summary(final))
  return _summary(run, history, final)


# The config fields that decide what a checkpoint holds and whose run it is; a
# workdir's run.json records them, and a resume with other values is refused.
_RUN_FIELDS = ('dataset', 'model', 'preset', 'deformable', 'modulated', 'conv', 'dtype', 'optimizer', 'seed',
               'num_seeds')


def _check_same_run(workdir: str, run_file: str, identity: dict) -> None:
  if not os.path.exists(run_file):
    return  # a checkpoint from before run.json existed: the restore itself checks the tree
  with open(run_file) as f:
    saved = json.load(f)
  differ = [k for k in _RUN_FIELDS if k in saved and saved[k] != identity[k]]
  if differ:
    held = ', '.join(f'{k}={saved[k]!r}' for k in differ)
    wanted = ', '.join(f'{k}={identity[k]!r}' for k in differ)
    raise ConfigError(f'config.workdir={workdir!r} holds a checkpoint of another run ({held}; this run: {wanted}); '
                      'use another workdir, or delete it to start over')


def _train_metrics(sums: dict[str, np.ndarray]) -> dict:
  acc = Accumulator()
  acc.add({k: v for k, v in sums.items() if k != 'count'}, sums['count'])
  return acc.result()


def _log_eval(path: str | None, step: int, seeds: list[int], results: dict | list[dict]) -> None:
  if len(seeds) == 1:
    _log_line(path, {'step': step, 'split': 'eval', **results})
  else:
    for seed, res in zip(seeds, results):
      _log_line(path, {'step': step, 'split': 'eval', 'seed': seed, **res})


def param_checksum(params: Any) -> float:
  """A float that changes when any parameter changes (for tests and logs)."""
  # Replicated arrays of a multi-process run are not fully addressable: read the local copy.
  local = lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x, np.float64)
  return float(sum(np.sum(local(x) * (i + 1)) for i, x in enumerate(jax.tree.leaves(params))))


__all__ = ['ConfigError', 'DataError', 'Interrupted', 'evaluate', 'format_summary', 'model_factory',
           'param_checksum', 'train']
