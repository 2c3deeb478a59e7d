"""Pure-function ops on jax.Array: bilinear sampling, deformable conv, deformable RoI pooling."""

from deformjax.ops.deform_conv import columns_bytes, deform_conv2d, output_size
from deformjax.ops.sampling import bilinear_sample

__all__ = ['bilinear_sample', 'columns_bytes', 'deform_conv2d', 'output_size']
