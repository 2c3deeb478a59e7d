"""Flax NNX modules wrapping the ops; `deformjax.nn.linen` has the Linen twins, `deformjax.nn.convert` the
PyTorch converters, `deformjax.nn.detr_encoder` the Deformable DETR encoder's building blocks."""

from deformjax.nn import convert, detr_encoder, linen
from deformjax.nn.dcnv3 import DCNv3
from deformjax.nn.dcnv4 import DCNv4
from deformjax.nn.deform_conv import DeformConv
from deformjax.nn.detr_encoder import DeformableDetrEncoder, DeformableDetrEncoderLayer, DeformableDetrEncoderOutput
from deformjax.nn.ms_deform_attn import MSDeformAttn
from deformjax.nn.roi_pool import DeformRoIPool

__all__ = ['DCNv3', 'DCNv4', 'DeformConv', 'DeformRoIPool', 'DeformableDetrEncoder', 'DeformableDetrEncoderLayer',
           'DeformableDetrEncoderOutput', 'MSDeformAttn', 'convert', 'detr_encoder', 'linen']
