"""Pure-function ops on jax.Array: bilinear sampling, deformable conv, deformable RoI pooling."""

from deformjax.ops._policy import (
    CPU_CHUNK_BYTES,
    DEFAULT_ACCELERATOR_MEMORY_BUDGET,
    accelerator_memory_budget,
    current_accelerator_memory_budget,
)
from deformjax.ops._policy import __getattr__ as __getattr__  # the deprecated ACCELERATOR_MEMORY_BUDGET
from deformjax.ops.deform_conv import columns_bytes, deform_conv2d, output_size
from deformjax.ops.roi_pool import deform_roi_pool, roi_align
from deformjax.ops.sampling import bilinear_sample

__all__ = ['CPU_CHUNK_BYTES', 'DEFAULT_ACCELERATOR_MEMORY_BUDGET', 'accelerator_memory_budget', 'current_accelerator_memory_budget', 'bilinear_sample', 'columns_bytes', 'deform_conv2d', 'deform_roi_pool', 'output_size', 'roi_align']
