"""deformjax: deformable convolution and attention for JAX and Flax.

`deformjax.ops` holds the pure functions (DCNv1/v2 `deform_conv2d`, deformable RoI pooling, DCNv3, DCNv4,
multi-scale deformable attention), `deformjax.nn` the Flax NNX modules and their Linen twins; both need only jax,
flax and numpy. `deformjax.models`, `deformjax.export`, `deformjax.viz`, `deformjax.data` and `deformjax.train` are
imported by name where needed (the last three need the `train` / `data` extras, `export` needs jax2onnx).
"""

from deformjax import nn, ops

__version__ = '0.2.0.dev0'
__all__ = ['nn', 'ops', '__version__']
