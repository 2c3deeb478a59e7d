"""Flax's own models made deformable: an `nnx.Conv` into a `DeformConv`, a Linen model's parameters into those of
its deformable twin. The DCN recipe ("take a pretrained network, make the 3x3 convs of its last stages deformable")
without hand-renaming parameter trees: each deformable layer starts computing what the conv it replaces computes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from deformjax.nn.deform_conv import DeformConv


def from_conv(conv: nnx.Conv, **deform_kwargs: Any) -> DeformConv:
  """A `DeformConv` computing exactly what the trained `conv` computes, until its offsets learn.

  Args:
    conv: a 2-D `nnx.Conv`; its geometry, dtypes, precision, kernel and bias carry over.
    **deform_kwargs: `DeformConv`'s deformable options (`offset_groups`, `modulated`, `max_offset`, ...).

  Returns:
    A `DeformConv` whose offset predictor starts at zero.

  Raises:
    TypeError: `conv` is not an `nnx.Conv`.
    ValueError: `conv` is not 2-D.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx, traverse_util
    >>> from deformjax.convert import from_conv
    >>> conv = nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0))
    >>> layer = from_conv(conv)
    >>> x = jnp.ones((1, 10, 10, 8), jnp.float32)
    >>> bool(jnp.allclose(layer(x), conv(x), atol=1e-5))
    True
  """
  if not isinstance(conv, nnx.Conv):
    raise TypeError(f'from_conv: conv must be an nnx.Conv, got {type(conv).__name__}')
  if len(conv.kernel_size) != 2:
    raise ValueError(f'from_conv: conv must be 2-D, got kernel_size={conv.kernel_size}')
  layer = DeformConv(
      conv.in_features, conv.out_features, tuple(conv.kernel_size), conv.strides, padding=conv.padding,
      input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
      feature_group_count=conv.feature_group_count, use_bias=conv.use_bias, mask=conv.mask, dtype=conv.dtype,
      param_dtype=conv.param_dtype, precision=conv.precision, promote_dtype=conv.promote_dtype,
      preferred_element_type=conv.preferred_element_type, rngs=nnx.Rngs(0), **deform_kwargs,
  )
  layer.kernel[...] = conv.kernel[...]
  if conv.bias is not None:
    assert layer.bias is not None  # built with conv.use_bias
    layer.bias[...] = conv.bias[...]
  return layer


def linen_params(fresh: Mapping[str, Any], pretrained: Mapping[str, Any],
                 rename: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Parameters for a Linen model with DeformConvs, taken from the pretrained regular model.

  Args:
    fresh: the deformable model's `init` parameters (its tree says what is needed).
    pretrained: the regular model's parameters.
    rename: module paths of `fresh` -> paths in `pretrained`, '/'-separated, for
      modules whose name changed (auto-naming: replacing `Conv_3` of four
      convs makes it `DeformConv_0`, and later convs shift down by one). Giving
      the DeformConv the old `name=` avoids any renaming.

  Returns:
    A tree shaped like `fresh` holding the pretrained values; every DeformConv's
    `offset_conv` keeps its fresh (zero) values, so the model computes what the
    pretrained one does at step 0.

  Raises:
    ValueError: naming the path of a parameter missing from `pretrained` or of
      a different shape there.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from deformjax.convert import linen_params
    >>> from deformjax.nn import linen
    >>> class Net(nn.Module):
    ...   deformable: bool = False
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.Conv(8, (3, 3))(x))
    ...     conv = linen.DeformConv(8, (3, 3), name='Conv_1') if self.deformable else nn.Conv(8, (3, 3))
    ...     return conv(x)
    >>> x = jnp.ones((1, 8, 8, 3), jnp.float32)
    >>> pretrained = Net().init(jax.random.key(0), x)['params']
    >>> fresh = Net(deformable=True).init(jax.random.key(1), x)['params']
    >>> params = linen_params(fresh, pretrained)  # same names: no rename needed
    >>> bool(jnp.allclose(Net(True).apply({'params': params}, x), Net().apply({'params': pretrained}, x), atol=1e-5))
    True
  """
  for name, tree in (('fresh', fresh), ('pretrained', pretrained)):
    if set(tree) == {'params'}:
      raise ValueError(f"linen_params: {name} is a variables dict {{'params': ...}}: pass {name}['params']")
  renames = sorted(dict(rename or {}).items(), key=lambda kv: -len(kv[0]))  # longest prefix first

  def source(path: str) -> str:
    for new, old in renames:
      if path == new or path.startswith(new + '/'):
        return old + path[len(new):]
    return path

  available = traverse_util.flatten_dict(pretrained, sep='/')
  out = {}
  for path, node in traverse_util.flatten_dict(fresh, sep='/').items():
    if '/offset_conv/' in f'/{path}':
      out[path] = node  # the deformable predictor: no pretrained counterpart, stays zero
      continue
    old = source(path)
    if old not in available:
      raise ValueError(f'linen_params: {path!r} (looked up as {old!r}) is not in the pretrained parameters; '
                       'pass rename={new_module_path: old_module_path}')
    value = available[old]
    if tuple(np.shape(value)) != tuple(np.shape(node)):
      raise ValueError(f'linen_params: {path!r} has shape {tuple(np.shape(node))} but pretrained {old!r} has '
                       f'{tuple(np.shape(value))}')
    out[path] = value
  return traverse_util.unflatten_dict(out, sep='/')


__all__ = ['from_conv', 'linen_params']
