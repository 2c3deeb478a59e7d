"""How training batches reach the devices: a device-resident split, or host batches prefetched.

A split that fits in device memory (digits, MNIST, Fashion-MNIST, CIFAR-10) is
placed on the devices once, sharded along the mesh's 'data' axis, and every
train step gathers its global batch on device from a permutation of
(seed, epoch): nothing crosses from host to device per step. The gather is a
`shard_map`: each device picks, from its own shard, the examples of the global
batch that it holds, and a `psum_scatter` hands each device its slice of the
batch. So the batch of step t is the same on any number of devices or
processes (tested), and each device stores only 1/D of the split.

A split that does not fit (COCO) is read by grain on the host; `Prefetcher`
keeps the next batches already transferred to the devices while the current
step runs, and checkpoints the grain position of the next batch it has *not*
handed out, so resume stays exact.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deformjax.data.loader import train_iterator
from deformjax.data.sources import DatasetSpec, RandomAccessSource
from deformjax.train import mesh as mesh_lib

if TYPE_CHECKING:  # grain is imported by the loader that builds the iterator
  import grain

# A split is placed on the devices when its images as float32 take at most this
# many bytes (CIFAR-10's 50,000 x 32x32x3 is 614 MB; COCO is far beyond).
DEVICE_DATA_MAX_BYTES = 1 << 30
# Records read per stack when a split is read record by record (bounds the host's list of records).
_LOAD_CHUNK = 4096


def fits_on_device(spec: DatasetSpec, num_examples: int) -> bool:
  """Whether `num_examples` images of `spec` as float32 fit in `DEVICE_DATA_MAX_BYTES`.

  Example:
    >>> from deformjax.data import get_spec
    >>> from deformjax.train.feeding import fits_on_device
    >>> fits_on_device(get_spec('cifar10'), 50_000), fits_on_device(get_spec('coco9'), 118_287)
    (True, False)
  """
  return num_examples * int(np.prod(spec.image_shape)) * 4 <= DEVICE_DATA_MAX_BYTES


def _label_dtype(layout: Mapping[str, jax.ShapeDtypeStruct], key: str) -> np.dtype:
  return np.dtype(layout[key].dtype)


def stack_records(records: Sequence[Mapping[str, Any]], spec: DatasetSpec,
                  layout: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Records -> `(images [n, H, W, C], {key: [n, ...]})` in their stored image dtype and the layout's label dtypes.

  Args:
    records: dicts with `'image'` and every key of `layout`.
    spec: the data's spec (`image_shape`).
    layout: the task's label layout (`Task.label_layout`): key -> one example's shape and dtype.

  Returns:
    The stacked images (uint8 kept, anything else float32) and labels.
  """
  images = np.stack([np.asarray(r['image']) for r in records])
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  images = images.reshape((len(records),) + tuple(spec.image_shape))
  labels = {k: np.stack([np.asarray(r[k]) for r in records]).astype(_label_dtype(layout, k))
            .reshape((len(records),) + tuple(layout[k].shape)) for k in layout}
  return images, labels


def read_split(source: RandomAccessSource, spec: DatasetSpec,
               layout: Mapping[str, jax.ShapeDtypeStruct] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """All records of `source` as `(images, labels)` numpy arrays, images in their stored dtype.

  uint8 images stay uint8 (a quarter of the float32 bytes on the device); the
  train step scales them to [0, 1] exactly as `to_model_inputs` does.

  Args:
    source: the split.
    spec: its spec (`image_shape`).
    layout: the task's label layout; None: classification's (`'label'`, int32 or float32 multi-hot by
      `spec.multilabel`).

  Returns:
    `(images [N, H, W, C], {key: [N, ...]})`.
  """
  if layout is None:
    from deformjax.train.task import default_task

    layout = default_task(spec).label_layout(spec)
  if _holds_arrays(source) and tuple(layout) == ('label',):
    return _array_split(source, spec, layout)
  images, labels = [], []
  for start in range(0, len(source), _LOAD_CHUNK):
    chunk = stack_records([source[i] for i in range(start, min(len(source), start + _LOAD_CHUNK))], spec, layout)
    images.append(chunk[0])
    labels.append(chunk[1])
  return np.concatenate(images), {k: np.concatenate([c[k] for c in labels]) for k in layout}


class _ArraysSource(RandomAccessSource, Protocol):
  """A source that also holds its whole split as arrays (`ArraySource`)."""

  @property
  def images(self) -> Any: ...

  @property
  def labels(self) -> Any: ...


def _holds_arrays(source: RandomAccessSource) -> TypeGuard[_ArraysSource]:
  """Whether `source` holds its split as arrays (`images`, `labels`), as `ArraySource` does."""
  return hasattr(source, 'images') and hasattr(source, 'labels')


def _array_split(source: _ArraysSource, spec: DatasetSpec,
                 layout: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """`read_split` of an `ArraySource`: its arrays, without reading record by record."""
  images = np.asarray(source.images)
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  n = len(images)
  label = np.asarray(source.labels).astype(_label_dtype(layout, 'label')).reshape((n,) + tuple(layout['label'].shape))
  return images.reshape((n,) + tuple(spec.image_shape)), {'label': label}


# uint8 -> [0, 1] as numpy computes it in `to_model_inputs` (a correctly rounded
# float32 division). Looked up rather than divided on device, where XLA turns
# x / 255 into x * (1/255), one ulp off for some values.
_UNIT_SCALE = np.arange(256, dtype=np.float32) / 255.0


def model_images(images: jax.Array) -> jax.Array:
  """Stored images -> float32 in [0, 1], bit-identical to `to_model_inputs`."""
  if images.dtype == jnp.uint8:
    return jnp.asarray(_UNIT_SCALE)[images.astype(jnp.int32)]
  return images.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
  """A whole split on the mesh: `images [N_pad, H, W, C]`, `labels` (a dict of `[N_pad, ...]` arrays, the task's
  label layout, or one array), sharded over 'data'.

  `size` is the real example count N; rows past it are padding that no
  permutation ever indexes.
  """

  images: jax.Array
  labels: Any
  size: int

  @classmethod
  def place(cls, images: np.ndarray, labels: Any, mesh: Mesh) -> DeviceSplit:
    """Every process passes the whole split; each device keeps its shard only."""
    n = len(images)
    pad = -n % mesh.size
    sharding = mesh_lib.batch_sharding(mesh)

    def put(a):
      a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return cls(put(images), jax.tree.map(put, labels), n)


def epoch_permutation(mesh: Mesh, seed: int, epoch: int, size: int) -> jax.Array:
  """The example order of `epoch` (replicated on the mesh): a function of (seed, epoch) only."""
  return _permutation(size, mesh_lib.replicated(mesh))(jnp.asarray(seed, jnp.uint32), jnp.asarray(epoch, jnp.int32))


@functools.lru_cache(maxsize=16)
def _permutation(size: int, sharding: NamedSharding):
  def permutation(seed, epoch):
    return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), size).astype(jnp.int32)

  return jax.jit(permutation, out_shardings=sharding)


def gather_batch(mesh: Mesh, images: jax.Array, labels: Any, indices: jax.Array) -> tuple[jax.Array, Any]:
  """Rows `indices` (a replicated `[B]` of global example numbers) of a sharded split, sharded over 'data'.

  Each device gathers the requested rows it holds (zeros elsewhere) and a
  `psum_scatter` sums and splits them: one device holds each row, so the sum is
  exact. Images come back as float32 in [0, 1].

  Args:
    mesh: the data mesh.
    images: `[N_pad, H, W, C]`, sharded over 'data'.
    labels: an array or a dict of arrays (the task's label layout), each `[N_pad, ...]`, sharded like `images`.
    indices: `[B]` int32, replicated.

  Returns:
    `(images [B, H, W, C] float32, labels [B, ...] as given)`, sharded over 'data'.
  """

  def local(img, lab, idx):
    rows = img.shape[0]
    offset = idx - lax.axis_index(mesh_lib.DATA) * rows
    here = (offset >= 0) & (offset < rows)
    safe = jnp.clip(offset, 0, rows - 1)
    # Booleans cannot be summed: a bool label crosses the scatter as int8.
    mask = lambda x: jnp.where(here.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
    scatter = lambda x: lax.psum_scatter(x, mesh_lib.DATA, scatter_dimension=0, tiled=True)
    rows_of = lambda x: (scatter(mask(x[safe]).astype(jnp.int8)).astype(bool) if x.dtype == jnp.bool_
                         else scatter(mask(x[safe])))
    return scatter(mask(model_images(img[safe]))), jax.tree.map(rows_of, lab)

  spec = P(mesh_lib.DATA)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=(spec, spec))(images, labels, indices)


def host_batches(source: RandomAccessSource, spec: DatasetSpec, layout: Mapping[str, jax.ShapeDtypeStruct], *,
                 global_batch: int, seed: int, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless grain iterator of this process's share of shuffled global batches, as the train step takes them.

  Each epoch is reshuffled (grain combines the seed with the epoch); the last partial batch of an epoch is
  dropped. The global batch of step t is the same whatever the number of processes.

  Args:
    source: the split.
    spec: its spec (`image_shape`).
    layout: the task's label layout.
    global_batch: examples per step across all processes; a multiple of `process_count`.
    seed: the shuffle seed.
    process_index: this process.
    process_count: how many share the batch.

  Returns:
    A grain iterator (with `get_state()` / `set_state()` for checkpoints) of numpy dicts: `'image'` float32
    `[b, H, W, C]` in [0, 1] and the layout's labels `[b, ...]`, `b = global_batch // process_count`.
  """
  return train_iterator(source, spec, global_batch=global_batch, seed=seed, process_index=process_index,
                        process_count=process_count, make_batch=lambda records: model_batch(records, spec, layout))


def model_batch(records: Sequence[Mapping[str, Any]], spec: DatasetSpec,
                layout: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
  """Records -> `{'image': float32 [n, H, W, C] in [0, 1], **labels}` (uint8 images divided by 255 in numpy)."""
  images, labels = stack_records(records, spec, layout)
  images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
  return {'image': images, **labels}


def eval_batches(source: RandomAccessSource, spec: DatasetSpec, layout: Mapping[str, jax.ShapeDtypeStruct], *,
                 global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """One ordered pass over `source` in global batches; the last is padded.

  Args:
    source: the split.
    spec: its spec.
    layout: the task's label layout.
    global_batch: examples per step across all processes.
    process_index: this process.
    process_count: how many share the batch.

  Yields:
    `(batch, valid)`: this process's `global_batch // process_count` examples as `model_batch` makes them, and
    a bool `[local_batch]` marking the real examples (padding repeats example 0).
  """
  local = global_batch // process_count
  n = len(source)
  for start in range(0, n, global_batch):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = idx < n
    yield model_batch([source[int(i)] for i in np.where(valid, idx, 0)], spec, layout), valid


class Prefetcher:
  """Host batches (a grain iterator) transferred to the devices `depth` steps ahead.

  `next()` hands out device arrays whose transfer was started while earlier steps
  ran. `get_state()` / `set_state()` speak for the next batch *not yet handed
  out*, so a checkpoint of this object (through grain's orbax handler) resumes
  exactly where training stopped, whatever was in flight.

  Args:
    iterator: the host batches, a grain iterator (it has `get_state()` / `set_state()`).
    put: host batch -> device batch (e.g. `deformjax.train.mesh.global_batch` on the run's mesh).
    depth: how many batches are in flight ahead of the one handed out.
  """

  def __init__(self, iterator: grain.DatasetIterator, put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
               depth: int = 2):
    self.iterator = iterator
    self.put = put
    self.depth = depth
    self.queue: collections.deque = collections.deque()

  def _fill(self) -> None:
    while len(self.queue) < self.depth:
      state = self.iterator.get_state()
      self.queue.append((state, self.put(next(self.iterator))))

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    self._fill()
    _, batch = self.queue.popleft()
    self._fill()  # start the next transfers before this batch's step is dispatched
    return batch

  def get_state(self) -> bytes:
    """The grain position of the next batch not yet handed out, serialised."""
    state = self.queue[0][0] if self.queue else self.iterator.get_state()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    """Drops the batches in flight and moves the iterator to `state` (from `get_state`)."""
    self.queue.clear()
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    """Does nothing: grain's checkpoint handler calls it after a restore, and `next()` refills the queue."""


__all__ = ['DEVICE_DATA_MAX_BYTES', 'DeviceSplit', 'Prefetcher', 'epoch_permutation', 'eval_batches',
           'fits_on_device', 'gather_batch', 'host_batches', 'model_batch', 'model_images', 'read_split',
           'stack_records']
