"""Jitted, sharded train and eval steps.

The state (parameters, optimiser state, step, RNG key) is replicated and
donated; the batch is sharded over the mesh's 'data' axis. The train step
augments the batch on device with `random_affine`, keyed by (seed, step), so the
same step sees the same augmentation on any number of devices or processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from deformjax.data.augment import random_affine
from deformjax.data.sources import DatasetSpec
from deformjax.train import feeding
from deformjax.train import mesh as mesh_lib

# Per-dataset input normalisation (mean, std) applied after augmentation.
NORMALISATION = {
    1: ((0.1307,), (0.3081,)),  # MNIST's statistics, used for every grey-scale set
    3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalise(images: jax.Array) -> jax.Array:
  mean, std = NORMALISATION[images.shape[-1]]
  shape = (1,) * (images.ndim - 1) + (-1,)
  return (images - jnp.asarray(mean, images.dtype).reshape(shape)) / jnp.asarray(std, images.dtype).reshape(shape)


def augment(key, images, aug: ml_collections.ConfigDict):
  if aug.max_rotation_deg == 0 and aug.max_shift == 0 and tuple(aug.scale_range) == (1.0, 1.0):
    return images
  return random_affine(key, images, max_rotation_deg=aug.max_rotation_deg, max_shift=aug.max_shift,
                       scale_range=tuple(aug.scale_range))


def loss_and_metrics(logits, labels, multilabel: bool, weights=None):
  """Mean loss and per-example metric sums (weighted by `weights`, 1 = real example)."""
  if weights is None:
    weights = jnp.ones(logits.shape[:1], jnp.float32)
  if multilabel:
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
    correct = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
    sums = {'loss': jnp.sum(per_example * weights), 'accuracy': jnp.sum(correct.mean(-1) * weights),
            'per_class_accuracy': jnp.sum(correct * weights[:, None], axis=0)}
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1).astype(labels.dtype) == labels).astype(jnp.float32)
    sums = {'loss': jnp.sum(per_example * weights), 'accuracy': jnp.sum(correct * weights)}
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0), sums


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  if cfg.schedule == 'constant':
    lr = cfg.learning_rate
  elif cfg.schedule == 'step':  # torch's StepLR, stepped per epoch
    lr = optax.exponential_decay(cfg.learning_rate, transition_steps=cfg.step_epochs * steps_per_epoch,
                                 decay_rate=cfg.step_gamma, staircase=True)
  else:
    lr = optax.cosine_decay_schedule(cfg.learning_rate, total_steps)
  if cfg.optimizer == 'adam':
    return optax.adam(lr)
  if cfg.optimizer == 'adamw':
    return optax.adamw(lr, weight_decay=cfg.weight_decay)
  return optax.sgd(lr, momentum=0.9)


@dataclasses.dataclass
class Trainer:
  """The two jitted steps and the initial state they run on."""

  train_step: Callable  # (state, batch) -> (state, metric sums): a batch from the host
  resident_step: Callable  # (state, images, labels, permutation) -> same: the batch gathered on device
  eval_step: Callable
  init_state: Callable


# The config fields the compiled steps depend on, besides the model (its graphdef),
# the data spec, the mesh and the schedule length. Seeds, logging, checkpointing
# and evaluation settings are not among them, so runs that differ only there
# (the seeds of a study) share one compiled train step.
STEP_FIELDS = ('optimizer', 'learning_rate', 'weight_decay', 'schedule', 'step_epochs', 'step_gamma', 'batch_size',
               'train_augment')


def make_trainer(model: nnx.Module, cfg: ml_collections.ConfigDict, spec: DatasetSpec, mesh,
                 steps_per_epoch: int, total_steps: int) -> Trainer:
  """The jitted steps for `model` and `cfg` (reused across calls that share them) and an init for its state."""
  graphdef, params = nnx.split(model, nnx.Param)
  step_config = json.dumps({f: cfg[f].to_dict() if isinstance(cfg[f], ml_collections.ConfigDict) else cfg[f]
                            for f in STEP_FIELDS}, sort_keys=True)
  tx, jit_train, jit_resident, jit_eval = _compiled_steps(graphdef, spec, mesh, steps_per_epoch, total_steps,
                                                          step_config)

  def init_state(seed: int):
    with jax.numpy_dtype_promotion('standard'):  # see train_step
      opt_state = tx.init(params)
    state = {'params': params, 'opt_state': opt_state, 'step': jnp.zeros((), jnp.int32),
             'rng': jax.random.PRNGKey(seed), 'metrics': zero_metrics(spec)}
    return jax.device_put(state, mesh_lib.replicated(mesh))

  return Trainer(jit_train, jit_resident, jit_eval, init_state)


@functools.lru_cache(maxsize=16)
def _compiled_steps(graphdef, spec: DatasetSpec, mesh, steps_per_epoch: int, total_steps: int, step_config: str):
  cfg = ml_collections.ConfigDict(json.loads(step_config))
  tx = make_optimizer(cfg, steps_per_epoch, total_steps)
  repl, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  aug = cfg.train_augment

  def train_step(state, batch):
    key = jax.random.fold_in(state['rng'], state['step'])
    k_aug, k_drop = jax.random.split(key)
    images = normalise(augment(k_aug, batch['image'], aug))

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(images, train=True, rngs=nnx.Rngs(dropout=k_drop))
      loss, sums = loss_and_metrics(logits, batch['label'], spec.multilabel)
      return loss, sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    # optax's schedules mix Python floats with the int32 step count, which a user's
    # jax_numpy_dtype_promotion='strict' rejects; the promotion is optax's choice.
    with jax.numpy_dtype_promotion('standard'):
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    # Metric sums since the last log line ride in the state: nothing is read per
    # step, and a checkpoint taken between log lines resumes the window it is in.
    metrics = {**sums, 'count': jnp.asarray(batch['label'].shape[0], jnp.float32)}
    new_state = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
                 'step': state['step'] + 1, 'rng': state['rng'],
                 'metrics': jax.tree.map(jnp.add, state['metrics'], metrics)}
    return new_state, sums

  def resident_step(state, images, labels, permutation):
    # Position within the epoch from the step counter on the device: the host
    # only hands over the epoch's permutation, once per epoch.
    start = (state['step'] % steps_per_epoch) * cfg.batch_size
    indices = jax.lax.dynamic_slice(permutation, (start,), (cfg.batch_size,))
    image, label = feeding.gather_batch(mesh, images, labels, indices)
    return train_step(state, {'image': image, 'label': label})

  def eval_step(params, batch, valid, key, eval_aug):
    images = normalise(augment(key, batch['image'], eval_aug))
    logits = nnx.merge(graphdef, params)(images)
    _, sums = loss_and_metrics(logits, batch['label'], spec.multilabel, valid.astype(jnp.float32))
    return sums, logits

  jit_train = jax.jit(train_step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
  jit_resident = jax.jit(resident_step, in_shardings=(repl, data, data, repl), out_shardings=(repl, repl),
                         donate_argnums=0)
  jit_eval = jax.jit(eval_step, in_shardings=(repl, data, data, repl), out_shardings=(repl, data),
                     static_argnums=4)
  return tx, jit_train, jit_resident, jit_eval


def zero_metrics(spec: DatasetSpec) -> dict:
  """The train metric sums `train_step` accumulates (as `loss_and_metrics` returns them) plus the example count."""
  zeros = {'loss': jnp.zeros((), jnp.float32), 'accuracy': jnp.zeros((), jnp.float32),
           'count': jnp.zeros((), jnp.float32)}
  if spec.multilabel:
    zeros['per_class_accuracy'] = jnp.zeros((spec.num_classes,), jnp.float32)
  return zeros


def frozen_augment(aug: ml_collections.ConfigDict):
  """A hashable copy of an augment config, for the static argument of eval_step."""
  return _FrozenAug(float(aug.max_rotation_deg), float(aug.max_shift), tuple(float(s) for s in aug.scale_range))


@dataclasses.dataclass(frozen=True)
class _FrozenAug:
  max_rotation_deg: float
  max_shift: float
  scale_range: tuple


def host_array(x) -> np.ndarray:
  """A sharded global array as a numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
