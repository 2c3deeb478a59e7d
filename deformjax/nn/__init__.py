"""Flax NNX modules wrapping the ops; `deformjax.nn.linen` has the Linen twins (converters: `deformjax.convert`;
the Deformable DETR encoder lives with its detector in `deformjax.models`)."""

from deformjax.nn import linen
from deformjax.nn.dcnv3 import DCNv3
from deformjax.nn.dcnv4 import DCNv4
from deformjax.nn.deform_conv import DeformConv
from deformjax.nn.ms_deform_attn import MSDeformAttn
from deformjax.nn.roi_pool import DeformRoIPool
from deformjax.nn.sampling import AttentionSampling, Sampling

__all__ = ['AttentionSampling', 'DCNv3', 'DCNv4', 'DeformConv', 'DeformRoIPool', 'MSDeformAttn', 'Sampling', 'linen']
