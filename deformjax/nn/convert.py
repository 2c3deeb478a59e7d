"""Turning trained convolutions and PyTorch DCN checkpoints into DeformConv layers.

The DCN recipe is "take a pretrained network, make the 3x3 convs of its last
stages deformable". These helpers do it without hand-renaming parameter trees,
and load the two forms DCN checkpoints come in (torchvision `DeformConv2d`,
mmcv `DeformConv2dPack` / `ModulatedDeformConv2dPack`) from numpy arrays,
without importing torch.

Conventions that differ, and what the helpers do about them:

- Layout: PyTorch weights are OIHW, ours HWIO: `weight.transpose(2, 3, 1, 0)`.
- Mask: mmcv's modulated layer uses `sigmoid(logits)`, ours `2*sigmoid(logits)`
  (so that a fresh layer equals a conv). The output is linear in the mask, so
  loading halves the kernel: the result is exactly mmcv's (a factor of 2 is
  exact in floating point).
- Offsets: mmcv's predictor output is `(o1, o2, mask_logits)` chunks whose
  `cat(o1, o2)` is torchvision's (dy, dx)-per-tap order, which is ours: its
  weights copy over unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from deformjax.nn.deform_conv import DeformConv


def from_conv(conv: nnx.Conv, **deform_kwargs) -> DeformConv:
  """A `DeformConv` computing exactly what the trained `conv` computes, until its offsets learn.

  Geometry, dtypes, precision and the kernel / bias values come from `conv`;
  `deform_kwargs` set the deformable options (`offset_groups`, `modulated`,
  `max_offset`, ...). The offset predictor starts at zero.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import convert
    >>> conv = nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0))
    >>> layer = convert.from_conv(conv)
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
    layer.bias[...] = conv.bias[...]
  return layer


def linen_params(fresh, pretrained, rename: Mapping[str, str] | None = None):
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
    >>> from deformjax.nn import convert, linen
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
    >>> params = convert.linen_params(fresh, pretrained)  # same names: no rename needed
    >>> bool(jnp.allclose(Net(True).apply({'params': params}, x), Net().apply({'params': pretrained}, x), atol=1e-5))
    True
  """
  rename = dict(rename or {})

  def source(path):
    for new, old in sorted(rename.items(), key=lambda kv: -len(kv[0])):
      if path == new or path.startswith(new + '/'):
        return old + path[len(new):]
    return path

  def lookup(tree, path):
    node = tree
    for part in path.split('/'):
      if not isinstance(node, Mapping) or part not in node:
        return None
      node = node[part]
    return node

  def build(node, path):
    if isinstance(node, Mapping):
      return {k: build(v, f'{path}/{k}' if path else k) for k, v in node.items()}
    if '/offset_conv/' in f'/{path}':
      return node
    old = source(path)
    value = lookup(pretrained, old)
    if value is None:
      raise ValueError(f'linen_params: {path!r} (looked up as {old!r}) is not in the pretrained parameters; '
                       'pass rename={new_module_path: old_module_path}')
    if tuple(np.shape(value)) != tuple(np.shape(node)):
      raise ValueError(f'linen_params: {path!r} has shape {tuple(np.shape(node))} but pretrained {old!r} has '
                       f'{tuple(np.shape(value))}')
    return value

  return build(fresh, '')


def _check_weight(weight, name: str) -> np.ndarray:
  weight = np.asarray(weight)
  if weight.ndim != 4:
    raise ValueError(f'{name} must be an OIHW array [C_out, C_in // groups, kh, kw], got shape {weight.shape}')
  return weight


def from_torchvision(weight, bias=None, *, stride=1, padding=0, dilation=1, groups: int = 1,
                     offset_groups: int = 1, param_dtype=np.float32) -> DeformConv:
  """A `DeformConv` holding a torchvision `DeformConv2d`'s weights: offsets (and mask) passed in.

  Args:
    weight: `DeformConv2d.weight` as numpy, OIHW `[C_out, C_in // groups, kh, kw]`.
    bias: `DeformConv2d.bias` or None.
    stride, padding, dilation, groups: the module's (int or pair each).
    offset_groups: torchvision infers it from the offsets at call time; set it
      to what your offsets carry (`offset.shape[1] // (2*kh*kw)`).

  Returns:
    `DeformConv(..., predict_offsets=False)`: call it as `layer(x, offsets, mask)`
    with NHWC tensors (`transpose(0, 2, 3, 1)` of torchvision's NCHW ones);
    `mask` is used as given, as in torchvision.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> weight = np.random.default_rng(0).normal(size=(16, 8, 3, 3))  # DeformConv2d(8, 16, 3).weight.numpy()
    >>> layer = convert.from_torchvision(weight, np.zeros(16), padding=1)
    >>> layer(np.ones((1, 6, 6, 8), np.float32), np.zeros((1, 6, 6, 18), np.float32)).shape
    (1, 6, 6, 16)
  """
  weight = _check_weight(weight, 'from_torchvision: weight')
  cout, cin_g, kh, kw = weight.shape
  layer = DeformConv(cin_g * groups, cout, (kh, kw), stride, padding=padding, kernel_dilation=dilation,
                     feature_group_count=groups, offset_groups=offset_groups, use_bias=bias is not None,
                     predict_offsets=False, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  layer.kernel[...] = np.transpose(weight, (2, 3, 1, 0)).astype(param_dtype)
  if bias is not None:
    layer.bias[...] = np.asarray(bias, param_dtype)
  return layer


def from_mmcv(state: Mapping[str, np.ndarray], *, stride=1, padding=0, dilation=1, groups: int = 1,
              deform_groups: int = 1, prefix: str = '', param_dtype=np.float32) -> DeformConv:
  """A `DeformConv` reproducing an mmcv `ModulatedDeformConv2dPack` (DCNv2) or `DeformConv2dPack` (DCNv1).

  Args:
    state: the module's `state_dict()` entries as numpy arrays: `weight`,
      optional `bias`, `conv_offset.weight`, `conv_offset.bias` (under `prefix`,
      e.g. `'layer4.0.conv2.'` for a whole-network state dict).
    stride, padding, dilation, groups, deform_groups: the module's.

  Returns:
    A `DeformConv` whose offset predictor holds `conv_offset`; modulated when
    `conv_offset` predicts `3*deform_groups*kh*kw` channels (DCNv2), with the
    kernel halved so that our `2*sigmoid` mask reproduces mmcv's `sigmoid`.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> rng = np.random.default_rng(0)
    >>> state = {'weight': rng.normal(size=(16, 8, 3, 3)), 'bias': np.zeros(16),  # {k: v.numpy() for k, v in
    ...          'conv_offset.weight': np.zeros((27, 8, 3, 3)), 'conv_offset.bias': np.zeros(27)}  # sd.items()}
    >>> layer = convert.from_mmcv(state, padding=1)
    >>> layer.modulated, layer(np.ones((1, 6, 6, 8), np.float32)).shape
    (True, (1, 6, 6, 16))
  """
  def get(key, required=True):
    value = state.get(prefix + key)
    if value is None and required:
      raise ValueError(f'from_mmcv: state has no {prefix + key!r}; keys: {sorted(state)[:8]}...')
    return None if value is None else np.asarray(value)

  weight = _check_weight(get('weight'), f'from_mmcv: {prefix}weight')
  bias = get('bias', required=False)
  off_w = _check_weight(get('conv_offset.weight'), f'from_mmcv: {prefix}conv_offset.weight')
  off_b = get('conv_offset.bias')
  cout, cin_g, kh, kw = weight.shape
  taps = deform_groups * kh * kw
  if off_w.shape[0] not in (2 * taps, 3 * taps):
    raise ValueError(f'from_mmcv: conv_offset.weight predicts {off_w.shape[0]} channels; with deform_groups='
                     f'{deform_groups} and a {kh}x{kw} kernel it must be {2 * taps} (DCNv1) or {3 * taps} (DCNv2)')
  modulated = off_w.shape[0] == 3 * taps
  layer = DeformConv(cin_g * groups, cout, (kh, kw), stride, padding=padding, kernel_dilation=dilation,
                     feature_group_count=groups, offset_groups=deform_groups, use_bias=bias is not None,
                     modulated=modulated, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  kernel = np.transpose(weight, (2, 3, 1, 0))
  layer.kernel[...] = (kernel / 2 if modulated else kernel).astype(param_dtype)
  if bias is not None:
    layer.bias[...] = bias.astype(param_dtype)
  layer.offset_conv.kernel[...] = np.transpose(off_w, (2, 3, 1, 0)).astype(param_dtype)
  layer.offset_conv.bias[...] = off_b.astype(param_dtype)
  return layer


__all__ = ['from_conv', 'from_mmcv', 'from_torchvision', 'linen_params']
