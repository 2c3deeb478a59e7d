"""Pure-function ops on jax.Array: bilinear sampling, deformable conv, deformable RoI pooling, and the deformable
family (DCNv3, DCNv4, multi-scale deformable attention) on the same sampling core."""

from deformjax.ops._policy import (
    CPU_CHUNK_BYTES,
    DEFAULT_ACCELERATOR_MEMORY_BUDGET,
    accelerator_memory_budget,
    current_accelerator_memory_budget,
)
from deformjax.ops.dcnv3 import dcnv3, dcnv3_taps
from deformjax.ops.dcnv4 import dcnv4, offset_mask_channels
from deformjax.ops.deform_conv import columns_bytes, deform_conv2d, output_size
from deformjax.ops.ms_deform_attn import level_shapes, ms_deform_attn
from deformjax.ops.roi_pool import deform_roi_pool, roi_align
from deformjax.ops.sampling import bilinear_sample

__all__ = [
    'CPU_CHUNK_BYTES',
    'DEFAULT_ACCELERATOR_MEMORY_BUDGET',
    'accelerator_memory_budget',
    'bilinear_sample',
    'columns_bytes',
    'current_accelerator_memory_budget',
    'dcnv3',
    'dcnv3_taps',
    'dcnv4',
    'deform_conv2d',
    'deform_roi_pool',
    'level_shapes',
    'ms_deform_attn',
    'offset_mask_channels',
    'output_size',
    'roi_align',
]
