"""deformjax: deformable convolution for JAX and Flax."""

from deformjax import nn, ops

__version__ = '0.2.0.dev0'
__all__ = ['nn', 'ops', '__version__']
