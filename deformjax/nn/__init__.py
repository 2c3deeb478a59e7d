"""Flax NNX modules wrapping the ops; `deformjax.nn.linen` has the Linen twins."""

from deformjax.nn import convert, linen
from deformjax.nn.deform_conv import DeformConv
from deformjax.nn.roi_pool import DeformRoIPool

__all__ = ['DeformConv', 'DeformRoIPool', 'convert', 'linen']
