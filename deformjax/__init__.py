"""deformjax: deformable convolution for JAX and Flax."""

from deformjax import ops

__version__ = '0.1.0'
__all__ = ['ops', '__version__']
