"""Jitted, sharded train and eval steps.

The state (parameters, optimiser state, step, RNG key and, for a model with
variables other than parameters, their values as 'model_state') is replicated and
donated; the batch is sharded over the mesh's 'data' axis. The train step
augments the batch on device with `random_affine`, keyed by (seed, step), so the
same step sees the same augmentation on any number of devices or processes.

The augmentation ranges are traced arguments, not constants: settings that
differ only in their transforms (the conditions of a study) share one compiled
step. With `num_seeds > 1` the state carries a leading seed axis and one step
advances every seed (see `make_trainer`).

'model_state' (the BatchNorm statistics of the InternImage models) is updated by
the train-mode forward and read, unchanged, by evaluation. A model with only
parameters has no such entry, so its state, checkpoints and compiled steps are
those of a trainer without it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from deformjax.data.augment import random_affine
from deformjax.data.sources import DatasetSpec
from deformjax.train import feeding
from deformjax.train import mesh as mesh_lib
from deformjax.train.config import ConfigError
from deformjax.train.task import Task, default_task, shape_text

__all__ = ['NORMALISATION', 'SEED_BATCHING', 'Trainer', 'augment', 'augment_arrays', 'check_model', 'host_array',
           'make_optimizer', 'make_trainer', 'normalise', 'seed_batching_for', 'seed_slice']

_Tree = TypeVar('_Tree')

# Per-dataset input normalisation (mean, std) applied after augmentation, by channel count.
NORMALISATION: Mapping[int, tuple[tuple[float, ...], tuple[float, ...]]] = types.MappingProxyType({
    1: ((0.1307,), (0.3081,)),  # MNIST's statistics, used for every grey-scale set
    3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
})


def normalise(images: jax.Array) -> jax.Array:
  """Standardises images in [0, 1] with the `NORMALISATION` statistics of their channel count.

  Args:
    images: `[..., C]`.

  Returns:
    `(images - mean) / std` per channel for C 1 or 3, `images` as given for any other channel count; the shape
    and dtype of `images`.
  """
  if images.shape[-1] not in NORMALISATION:
    return images
  mean, std = NORMALISATION[images.shape[-1]]
  shape = (1,) * (images.ndim - 1) + (-1,)
  return (images - jnp.asarray(mean, images.dtype).reshape(shape)) / jnp.asarray(std, images.dtype).reshape(shape)


def augment_arrays(aug: ml_collections.ConfigDict) -> dict[str, np.float32]:
  """An augment config as the float32 scalars the jitted steps take (traced, so one compile serves every range)."""
  lo, hi = aug.scale_range
  return {k: np.float32(v) for k, v in (('max_rotation_deg', aug.max_rotation_deg), ('max_shift', aug.max_shift),
                                         ('scale_lo', lo), ('scale_hi', hi))}


def augment(key: jax.Array, images: jax.Array, aug: Mapping[str, jax.Array | np.float32]) -> jax.Array:
  """`random_affine` with the ranges of `aug` (see `augment_arrays`); the identity range skips the warp at run time.

  Args:
    key: the PRNG key of the draw.
    images: `[B, H, W, C]`.
    aug: 'max_rotation_deg', 'max_shift', 'scale_lo', 'scale_hi' as scalars (traced under jit).

  Returns:
    `[B, H, W, C]`, the warped images (`images` itself for the identity range).
  """
  identity = ((aug['max_rotation_deg'] == 0) & (aug['max_shift'] == 0) & (aug['scale_lo'] == 1)
              & (aug['scale_hi'] == 1))

  def warp(images):
    return random_affine(key, images, max_rotation_deg=aug['max_rotation_deg'], max_shift=aug['max_shift'],
                         scale_range=(aug['scale_lo'], aug['scale_hi']))

  return jax.lax.cond(identity, lambda x: x, warp, images)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformation:
  """The optimiser and learning-rate schedule `cfg` names.

  Args:
    cfg: a config with `optimizer` ('adam' | 'adamw' | 'sgd', momentum 0.9), `learning_rate`, `weight_decay`
      (adamw), `schedule` ('constant' | 'step' | 'cosine'), `step_epochs` and `step_gamma` (step), and
      optionally `warmup_steps` (a linear ramp multiplying the schedule) and `grad_clip` (a global norm).
    steps_per_epoch: train steps per epoch (the step schedule decays every `step_epochs` epochs).
    total_steps: the run's length (the cosine schedule decays to 0 over it).

  Returns:
    The optax transformation.
  """
  if cfg.schedule == 'constant':
    lr = cfg.learning_rate
  elif cfg.schedule == 'step':  # torch's StepLR, stepped per epoch
    lr = optax.exponential_decay(cfg.learning_rate, transition_steps=cfg.step_epochs * steps_per_epoch,
                                 decay_rate=cfg.step_gamma, staircase=True)
  else:
    lr = optax.cosine_decay_schedule(cfg.learning_rate, total_steps)
  lr = _warmed_up(lr, cfg.get('warmup_steps', 0))
  if cfg.optimizer == 'adam':
    tx = optax.adam(lr)
  elif cfg.optimizer == 'adamw':
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  else:
    tx = optax.sgd(lr, momentum=0.9)
  clip = cfg.get('grad_clip', 0.0)
  # Without clipping the optimiser state is the optimiser's alone, as in checkpoints written before clipping existed.
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _warmed_up(lr: float | optax.Schedule, warmup_steps: int) -> float | optax.Schedule:
  """`lr` times `min(1, (step + 1) / warmup_steps)`: the first step takes `1 / warmup_steps` of the rate."""
  if not warmup_steps:
    return lr
  schedule = lr if callable(lr) else optax.constant_schedule(lr)
  return lambda count: schedule(count) * jnp.minimum(1.0, (count + 1) / warmup_steps)


@dataclasses.dataclass
class Trainer:
  """The jitted steps and the initial state they run on.

  `aug` is `augment_arrays(cfg.train_augment)` (or an eval set's). With
  `num_seeds > 1` every leaf of the state has a leading seed axis, the
  resident step takes one permutation per seed (`[num_seeds, examples]`), and
  `eval_step` evaluates one seed's parameters (slice them with `seed_slice`).
  A batch is a dict: `'image'` `[B, H, W, C]` and the task's label arrays (`Task.label_layout`).
  """

  train_step: Callable  # (state, batch, aug) -> (state, metric sums): a batch from the host (one seed only)
  # (state, images, labels, permutation, aug) -> same: the batch gathered on device; labels: the task's dict
  resident_step: Callable
  # (params, batch, valid, key, aug, model_state=None) -> (metric sums, outputs); model_state: the state's
  # 'model_state' (one seed's), needed exactly when the model has one
  eval_step: Callable
  init_state: Callable  # (seeds: sequence of ints, one per seed) -> state
  num_seeds: int = 1
  compiled: tuple = ()  # the jitted functions behind the steps (for their compile caches)
  task: Task | None = None  # what is trained (loss, metrics, evaluation, label layout)
  graphdef: nnx.GraphDef | None = None  # the model's structure: nnx.merge(graphdef, params[, model_state])
  model_name: str = ''  # the model's class name


# The config fields the compiled steps depend on, besides the model (its graphdef),
# the data spec, the mesh, the schedule length and the number of seeds. Seeds,
# augmentation ranges, logging, checkpointing and evaluation settings are not
# among them, so runs that differ only there (the seeds and conditions of a
# study) share one compiled train step.
_STEP_FIELDS = ('optimizer', 'learning_rate', 'weight_decay', 'schedule', 'step_epochs', 'step_gamma', 'warmup_steps',
                'grad_clip', 'batch_size')

# Step fields a config written before they existed lacks (their default, 0, is what such a config trained with).
_OPTIONAL_STEP_FIELDS = ('warmup_steps', 'grad_clip')

# The values `seed_batching_for` (and `config.seed_batching`) accept.
SEED_BATCHING = ('auto', 'vmap', 'loop')


def seed_batching_for(mesh: Mesh, requested: str = 'auto') -> str:
  """How a step advances several seeds: 'vmap' (one batched program) or 'loop' (each seed's step in turn).

  'auto' picks per backend: accelerators fill up with the batched step. XLA:CPU
  turns a batched kernel into a grouped convolution, 2-3x slower per seed than
  the seeds' own steps (5-conv classifier, batch 64, 2 cores); the seeds' steps
  unrolled into one program ran side by side and oversubscribed the cores, and a
  `lax.map` over them ran 15x slower. 'loop' dispatches one compiled program,
  indexed by seed, once per seed.
  """
  if requested not in SEED_BATCHING:
    raise ValueError(f'seed_batching must be one of {SEED_BATCHING}, got {requested!r}')
  if requested != 'auto':
    return requested
  return 'loop' if mesh.devices.flat[0].platform == 'cpu' else 'vmap'


def seed_slice(tree: _Tree, i: int) -> _Tree:
  """Seed `i` of a state (or params) with a leading seed axis."""
  return jax.tree.map(lambda x: x[i], tree)


def make_trainer(model_fn: Callable[[int], nnx.Module], cfg: ml_collections.ConfigDict, spec: DatasetSpec,
                 mesh: Mesh, steps_per_epoch: int, total_steps: int, *, num_seeds: int = 1,
                 seed_batching: str = 'auto', task: Task | None = None) -> Trainer:
  """The jitted steps for the model `model_fn(seed)` builds and `cfg` (reused across calls that share them).

  `num_seeds > 1` trains that many independent copies (parameters, optimiser
  state, RNG and data order each from their own seed) in one step; each seed's
  numbers equal those of training it alone, to float32 rounding.
  `seed_batching`: see `seed_batching_for`. `task`: what is trained (see
  `deformjax.train.task.Task`); None: classification as `spec` says
  (single-label or multi-label).

  Raises:
    ConfigError: the model cannot take the images of `spec`, or its output does not fit the labels (one line,
      from `check_model`).
  """
  task = default_task(spec) if task is None else task
  model = nnx.eval_shape(lambda: model_fn(0))  # the structure only: each seed's state is drawn in init_state
  # flax types the parts of a split by filters as a tuple of any length; two filters give three.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
  has_model_state = bool(jax.tree.leaves(rest))
  sums_like = check_model(graphdef, params, rest if has_model_state else None, task, spec, type(model).__name__)
  step_config = tuple(sorted((f, cfg.get(f, 0) if f in _OPTIONAL_STEP_FIELDS else cfg[f]) for f in _STEP_FIELDS))
  batching = seed_batching_for(mesh, seed_batching) if num_seeds > 1 else 'single'
  tx, jit_train, jit_resident, jit_eval, compiled = _compiled_steps(graphdef, spec, mesh, steps_per_epoch,
                                                                    total_steps, step_config, num_seeds, batching,
                                                                    has_model_state, task)

  def one_state(seed: int) -> dict:
    _, params, rest = nnx.split(model_fn(seed), nnx.Param, ...)  # type: ignore[misc]  # as above
    with jax.numpy_dtype_promotion('standard'):  # see train_step
      opt_state = tx.init(params)
    state = {'params': params, 'opt_state': opt_state, 'step': jnp.zeros((), jnp.int32),
             'rng': jax.random.PRNGKey(seed), 'metrics': _zero_metrics(sums_like)}
    return {**state, 'model_state': rest} if has_model_state else state

  def init_state(seeds: int | Sequence[int]) -> dict:
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != num_seeds:
      raise ValueError(f'init_state needs {num_seeds} seeds, got {seeds}')
    states = [one_state(s) for s in seeds]
    state = states[0] if num_seeds == 1 else jax.tree.map(lambda *x: jnp.stack(x), *states)
    return jax.device_put(state, mesh_lib.replicated(mesh))

  return Trainer(jit_train, jit_resident, jit_eval, init_state, num_seeds, compiled, task, graphdef,
                 type(model).__name__)


def check_model(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State | None, task: Task,
                spec: DatasetSpec, name: str = 'model') -> dict[str, jax.ShapeDtypeStruct]:
  """Runs the model and the task's loss on a batch of 2 abstractly (`jax.eval_shape`: nothing is computed).

  Args:
    graphdef: the model's structure.
    params: its parameters.
    model_state: its other variables, or None when it has none.
    task: what is trained.
    spec: the data (image shape, classes).
    name: the model's name in the error.

  Returns:
    The shapes of the task's metric sums (what the train state accumulates).

  Raises:
    ConfigError: one line naming the model and the images when the model cannot take them, or the model's
      output and the labels when they do not fit (`Task.check_outputs`).
  """
  key = (graphdef, _shapes(params), _shapes(model_state), task, spec)
  if key not in _CHECKED:
    if len(_CHECKED) >= 64:
      _CHECKED.clear()
    _CHECKED[key] = _check_model(graphdef, params, model_state, task, spec, name)
  return _CHECKED[key]


# check_model's answers by (graphdef, parameter and state shapes, task, spec): a study's runs trace the model once.
_CHECKED: dict = {}


def _shapes(tree) -> tuple:
  return tuple((jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype))
               for p, x in jax.tree_util.tree_flatten_with_path(tree)[0])


def _check_model(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State | None, task: Task,
                 spec: DatasetSpec, name: str) -> dict[str, jax.ShapeDtypeStruct]:
  """`check_model` without its cache."""
  layout = task.label_layout(spec)
  batch = {'image': jax.ShapeDtypeStruct((2,) + tuple(spec.image_shape), jnp.float32),
           **{k: jax.ShapeDtypeStruct((2,) + tuple(v.shape), v.dtype) for k, v in layout.items()}}

  def forward(params, model_state, batch):
    model = nnx.merge(graphdef, params, *(() if model_state is None else (model_state,)), copy=True)
    return task.forward(model, batch, train=False, rngs=nnx.Rngs(dropout=jax.random.key(0)))

  try:
    outputs = jax.eval_shape(forward, params, model_state, batch)
  except Exception as e:  # whatever the model raises on images it cannot take
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'model {name} cannot take images {shape_text(batch["image"].shape)} of the data: '
                      f'{type(e).__name__}: {first}') from None
  try:
    task.check_outputs(outputs, spec)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _, sums = jax.eval_shape(task.loss, outputs, batch, jax.ShapeDtypeStruct((2,), jnp.float32))
  return sums


@dataclasses.dataclass(frozen=True)
class _StepPlan:
  """What every compiled step is built from: the model's graph, the data, the mesh and the optimiser."""
  graphdef: nnx.GraphDef
  spec: DatasetSpec
  mesh: Mesh
  tx: optax.GradientTransformation
  steps_per_epoch: int
  batch_size: int
  num_seeds: int
  has_model_state: bool  # the model has variables besides its parameters (BatchNorm statistics)
  task: Task

  def merge(self, params: nnx.State, model_state: nnx.State | None, copy: bool = False) -> nnx.Module:
    """The model with `params` (and `model_state`, exactly when the model has one)."""
    return nnx.merge(self.graphdef, params, *(model_state,) if self.has_model_state else (), copy=copy)


def _train_step(plan: _StepPlan, state: dict, batch: dict, aug: Mapping) -> tuple[dict, dict]:
  """One optimiser step on `batch` (`'image'` `[B, H, W, C]` and the task's labels); returns the new state and
  metric sums."""
  k_aug, k_drop = jax.random.split(jax.random.fold_in(state['rng'], state['step']))
  batch = {**batch, 'image': normalise(augment(k_aug, batch['image'], aug))}
  weights = jnp.ones(batch['image'].shape[:1], jnp.float32)

  def loss_fn(params):
    # copy: fresh variables of this trace, which the train-mode forward may update (the BatchNorm
    # statistics); merging the state's own variables would mutate them across trace levels.
    model = plan.merge(params, state.get('model_state'), copy=True)
    outputs = plan.task.forward(model, batch, train=True, rngs=nnx.Rngs(dropout=k_drop))
    loss, sums = plan.task.loss(outputs, batch, weights)
    # The train-mode forward updated the running statistics in the merged model.
    # flax types the parts of a split by filters as a tuple of any length; two filters give three.
    return loss, (sums, nnx.split(model, nnx.Param, ...)[2] if plan.has_model_state else None)  # type: ignore[misc]

  (_, (sums, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  # optax's schedules mix Python floats with the int32 step count, which a user's
  # jax_numpy_dtype_promotion='strict' rejects; the promotion is optax's choice.
  with jax.numpy_dtype_promotion('standard'):
    updates, opt_state = plan.tx.update(grads, state['opt_state'], state['params'])
  # Metric sums since the last log line ride in the state: nothing is read per
  # step, and a checkpoint taken between log lines resumes the window it is in.
  metrics = {**sums, 'count': jnp.asarray(batch['image'].shape[0], jnp.float32)}
  new_state = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
               'step': state['step'] + 1, 'rng': state['rng'],
               'metrics': jax.tree.map(jnp.add, state['metrics'], metrics)}
  return ({**new_state, 'model_state': model_state} if plan.has_model_state else new_state), sums


def _label_dict(labels) -> Mapping[str, Any]:
  """The device split's labels as the batch's label entries (one bare array is classification's `'label'`)."""
  return labels if isinstance(labels, Mapping) else {'label': labels}


def _resident_step(plan: _StepPlan, state: dict, images: jax.Array, labels, permutation: jax.Array,
                   aug: Mapping) -> tuple[dict, dict]:
  """`_train_step` on the batch the step counter selects from the device-resident split, in `permutation` order."""
  # Position within the epoch from the step counter on the device: the host
  # only hands over the epoch's permutation, once per epoch.
  start = (state['step'] % plan.steps_per_epoch) * plan.batch_size
  indices = jax.lax.dynamic_slice(permutation, (start,), (plan.batch_size,))
  image, label = feeding.gather_batch(plan.mesh, images, _label_dict(labels), indices)
  return _train_step(plan, state, {'image': image, **label}, aug)


def _seeds_resident_step(plan: _StepPlan, state: dict, images: jax.Array, labels, permutations: jax.Array,
                         aug: Mapping) -> tuple[dict, dict]:
  """Every seed's `_resident_step` as one batched program (`permutations`: `[num_seeds, examples]`)."""
  # Every seed is at the same step; each reads its own order. One gather for all
  # seeds, example-major so each device's share of the batch stays whole.
  start = (state['step'][0] % plan.steps_per_epoch) * plan.batch_size
  indices = jax.lax.dynamic_slice_in_dim(permutations, start, plan.batch_size, axis=1)  # [S, B]
  image, label = feeding.gather_batch(plan.mesh, images, _label_dict(labels), indices.T.reshape(-1))
  per_seed = lambda x: jnp.swapaxes(x.reshape((plan.batch_size, plan.num_seeds) + x.shape[1:]), 0, 1)
  one = lambda st, im, lb: _train_step(plan, st, {'image': im, **lb}, aug)
  return jax.vmap(one)(state, per_seed(image), jax.tree.map(per_seed, label))


def _one_seed_resident_step(plan: _StepPlan, state: dict, images: jax.Array, labels: jax.Array,
                            permutations: jax.Array, aug: Mapping, i: jax.Array) -> tuple[dict, dict]:
  """Seed `i`'s `_resident_step` on the stacked state, written back in place (the state is donated)."""
  take = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
  new, sums = _resident_step(plan, jax.tree.map(take, state), images, labels, take(permutations), aug)
  put = lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0)
  return jax.tree.map(put, state, new), sums


def _eval_step(plan: _StepPlan, params: nnx.State, batch: dict, valid: jax.Array, key: jax.Array, aug: Mapping,
               model_state: nnx.State | None) -> tuple[dict, object]:
  """Metric sums over the `valid` examples of `batch` (transformed by `aug`, keyed by `key`) and the outputs."""
  batch = {**batch, 'image': normalise(augment(key, batch['image'], aug))}
  outputs = plan.task.forward(plan.merge(params, model_state, copy=True), batch, train=False,
                              rngs=nnx.Rngs(dropout=key))
  _, sums = plan.task.loss(outputs, batch, valid.astype(jnp.float32))
  return sums, outputs


def _checked_eval(jit_eval_step: Callable, has_model_state: bool, params, batch, valid, key, aug,
                  model_state=None):
  """`Trainer.eval_step`: the jitted `_eval_step`, refusing a missing `model_state` by name."""
  if has_model_state and model_state is None:
    raise ValueError("eval_step: this model has variables besides its parameters (BatchNorm statistics): pass "
                     "the train state's 'model_state' as model_state")
  return jit_eval_step(params, batch, valid, key, aug, model_state if has_model_state else None)


def _loop_over_seeds(jit_one_seed: Callable, num_seeds: int, state, images, labels, permutations, aug):
  """The resident step of `seed_batching='loop'`: `_one_seed_resident_step` dispatched once per seed, in turn.

  Each runs the single seed's program at its single-seed speed, and one compile serves every seed.
  """
  sums = []
  for i in range(num_seeds):
    state, s = jit_one_seed(state, images, labels, permutations, aug, np.int32(i))
    sums.append(s)
  return state, jax.tree.map(lambda *x: jnp.stack(x), *sums)


@functools.lru_cache(maxsize=16)
def _compiled_steps(graphdef: nnx.GraphDef, spec: DatasetSpec, mesh: Mesh, steps_per_epoch: int,
                    total_steps: int, step_config: tuple, num_seeds: int, batching: str,
                    has_model_state: bool, task: Task) -> tuple:
  """`(tx, train_step, resident_step, eval_step, compiled)` for `make_trainer`, cached on what they depend on.

  `step_config`: the `_STEP_FIELDS` of the config as sorted `(field, value)` pairs.
  """
  cfg = ml_collections.ConfigDict(dict(step_config))
  plan = _StepPlan(graphdef, spec, mesh, make_optimizer(cfg, steps_per_epoch, total_steps), steps_per_epoch,
                   cfg.batch_size, num_seeds, has_model_state, task)
  repl, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  jit_train = jax.jit(functools.partial(_train_step, plan), in_shardings=(repl, data, repl),
                      out_shardings=(repl, repl), donate_argnums=0)
  jit_eval = jax.jit(functools.partial(_eval_step, plan), in_shardings=(repl, data, data, repl, repl, repl),
                     out_shardings=(repl, data))
  eval_step = functools.partial(_checked_eval, jit_eval, has_model_state)
  resident: dict[str, Any] = dict(in_shardings=(repl, data, data, repl, repl), out_shardings=(repl, repl),
                                  donate_argnums=0)
  if batching == 'loop':
    jit_one_seed = jax.jit(functools.partial(_one_seed_resident_step, plan),
                           **{**resident, 'in_shardings': resident['in_shardings'] + (repl,)})
    resident_step: Callable[..., Any] = functools.partial(_loop_over_seeds, jit_one_seed, num_seeds)
    return plan.tx, jit_train, resident_step, eval_step, (jit_train, jit_one_seed, jit_eval)
  resident_step = jax.jit(functools.partial(_resident_step if num_seeds == 1 else _seeds_resident_step, plan),
                          **resident)
  return plan.tx, jit_train, resident_step, eval_step, (jit_train, resident_step, jit_eval)


def _zero_metrics(sums_like: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The train metric sums `train_step` accumulates (zeros shaped as the task's sums) plus the example count."""
  zeros = {k: jnp.zeros(v.shape, jnp.float32) for k, v in sums_like.items()}
  return {**zeros, 'count': jnp.zeros((), jnp.float32)}


def host_array(x: jax.Array) -> np.ndarray:
  """A sharded global array as a numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
