"""Turning trained convolutions and PyTorch checkpoints into deformjax layers.

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

The deformable family (`from_internimage_dcnv3`, `from_dcnv4`,
`from_deformable_detr`) needs no re-laying out at all: `DCNv3`, `DCNv4` and
`MSDeformAttn` keep their references' (x, y) offset order, tap order and packed
channels, so a PyTorch `nn.Linear` weight `[out, in]` becomes a kernel by one
transpose and a depthwise `Conv2d` weight `[C, 1, k, k]` by `transpose(2, 3, 1, 0)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx, traverse_util
from jax.typing import DTypeLike

from deformjax.nn.dcnv3 import DCNv3, DCNv4
from deformjax.nn.deform_conv import DeformConv
from deformjax.nn.ms_deform_attn import MSDeformAttn


def from_conv(conv: nnx.Conv, **deform_kwargs: Any) -> DeformConv:
  """A `DeformConv` computing exactly what the trained `conv` computes, until its offsets learn.

  Geometry, dtypes, precision and the kernel / bias values come from `conv`;
  `deform_kwargs` set the deformable options (`offset_groups`, `modulated`,
  `max_offset`, ...). The offset predictor starts at zero.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx, traverse_util
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


def _check_weight(weight, name: str) -> np.ndarray:
  weight = np.asarray(weight)
  if weight.ndim != 4:
    raise ValueError(f'{name} must be an OIHW array [C_out, C_in // groups, kh, kw], got shape {weight.shape}')
  return weight


def from_torchvision(weight: np.ndarray, bias: np.ndarray | None = None, *, stride: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                     offset_groups: int = 1, param_dtype: DTypeLike = np.float32) -> DeformConv:
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


def from_mmcv(state: Mapping[str, np.ndarray], *, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
              dilation: int | Sequence[int] = 1, groups: int = 1,
              deform_groups: int = 1, prefix: str = '', param_dtype: DTypeLike = np.float32) -> DeformConv:
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



class _State:
  """Reads `prefix + key` from a numpy state dict, naming the key and the expected shape when it is wrong."""

  def __init__(self, state: Mapping[str, np.ndarray], prefix: str, fn: str, param_dtype):
    self.state, self.prefix, self.fn, self.dtype = state, prefix, fn, param_dtype
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return self.prefix + key in self.state

  def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    full = self.prefix + key
    if full not in self.state:
      raise ValueError(f'{self.fn}: state has no {full!r} (shape {shape}); keys: {sorted(self.state)[:8]}...')
    value = np.asarray(self.state[full])
    if value.shape != shape:
      raise ValueError(f'{self.fn}: {full!r} must have shape {shape}, got {value.shape}')
    self.used.add(full)
    return value.astype(self.dtype)

  def linear(self, module: nnx.Linear, key: str) -> None:
    """`nn.Linear` `key.weight [out, in]`, `key.bias [out]` -> `module.kernel [in, out]`, `module.bias`."""
    module.kernel[...] = self.get(f'{key}.weight', (module.out_features, module.in_features)).T
    if module.bias is not None:
      module.bias[...] = self.get(f'{key}.bias', (module.out_features,))

  def depthwise(self, module: nnx.Conv, key: str) -> None:
    """Depthwise `Conv2d` `key.weight [C, 1, k, k]` -> HWIO `[k, k, 1, C]`."""
    kh, kw, _, c = module.kernel.shape
    module.kernel[...] = self.get(f'{key}.weight', (c, 1, kh, kw)).transpose(2, 3, 1, 0)
    module.bias[...] = self.get(f'{key}.bias', (c,))

  def gate(self, module: nnx.Linear, key: str) -> None:
    """`center_feature_scale_proj_weight [groups, C]` / `_bias [groups]` (bare parameters, not an nn.Linear)."""
    module.kernel[...] = self.get(f'{key}_weight', (module.out_features, module.in_features)).T
    module.bias[...] = self.get(f'{key}_bias', (module.out_features,))

  def check_all_used(self) -> None:
    left = sorted(k for k in self.state if k.startswith(self.prefix) and k not in self.used)
    if left:
      raise ValueError(f'{self.fn}: state entries the layer has no parameter for: {left[:8]} (a different '
                       'configuration? check groups, kernel_size, remove_center and the prefix)')


def _channels(state: Mapping[str, np.ndarray], key: str, fn: str) -> int:
  if key not in state:
    raise ValueError(f'{fn}: state has no {key!r}; keys: {sorted(state)[:8]}...')
  weight = np.asarray(state[key])
  if weight.ndim != 2:
    raise ValueError(f'{fn}: {key!r} must be an nn.Linear weight [out, in], got shape {weight.shape}')
  return int(weight.shape[1])


def from_internimage_dcnv3(state: Mapping[str, np.ndarray], *, groups: int, kernel_size: int = 3,
                           padding: int | None = None, dilation: int = 1, offset_scale: float = 1.0,
                           remove_center: bool = False, prefix: str = '', param_dtype: DTypeLike = np.float32) -> DCNv3:
  """A `DCNv3` reproducing InternImage's `DCNv3` / `DCNv3_pytorch` module (`ops_dcnv3/modules/dcnv3.py`).

  Args:
    state: the module's `state_dict()` as numpy arrays (`{k: v.numpy() for k, v in sd.items()}`):
      `input_proj`, `output_proj`, `offset`, `mask` (`nn.Linear`s), `dw_conv.0` (the depthwise
      conv), `dw_conv.1.1` (its LayerNorm) and, with `center_feature_scale`,
      `center_feature_scale_proj_{weight, bias}`; under `prefix`
      (e.g. `'levels.2.blocks.0.dcn.'` for a whole InternImage).
    groups, kernel_size, padding, dilation, offset_scale, remove_center: the module's `group`,
      `kernel_size`, `pad`, `dilation`, `offset_scale`, `remove_center` (`channels`,
      `dw_kernel_size` and `center_feature_scale` are read from the weights). Only the
      LayerNorm / GELU offset branch (the reference's default) is supported.

  Returns:
    A `DCNv3` whose output equals the PyTorch module's for the same NHWC input.

  Raises:
    ValueError: naming a missing or wrongly shaped entry, or entries left unused.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> c, g, rng = 16, 4, np.random.default_rng(0)
    >>> state = {'input_proj.weight': rng.normal(size=(c, c)), 'input_proj.bias': np.zeros(c),
    ...          'output_proj.weight': rng.normal(size=(c, c)), 'output_proj.bias': np.zeros(c),
    ...          'dw_conv.0.weight': rng.normal(size=(c, 1, 3, 3)), 'dw_conv.0.bias': np.zeros(c),
    ...          'dw_conv.1.1.weight': np.ones(c), 'dw_conv.1.1.bias': np.zeros(c),
    ...          'offset.weight': np.zeros((g * 18, c)), 'offset.bias': np.zeros(g * 18),
    ...          'mask.weight': np.zeros((g * 9, c)), 'mask.bias': np.zeros(g * 9)}
    >>> layer = convert.from_internimage_dcnv3(state, groups=g)
    >>> layer(np.ones((1, 6, 6, c), np.float32)).shape
    (1, 6, 6, 16)
  """
  fn = 'from_internimage_dcnv3'
  channels = _channels(state, prefix + 'input_proj.weight', fn)
  dw = np.shape(state.get(prefix + 'dw_conv.0.weight', np.zeros((0, 0, kernel_size, kernel_size))))[-1]
  cfs = prefix + 'center_feature_scale_proj_weight' in state
  layer = DCNv3(channels, kernel_size, groups=groups, dw_kernel_size=int(dw), padding=padding,
                kernel_dilation=dilation, offset_scale=offset_scale, center_feature_scale=cfs,
                remove_center=remove_center, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  s = _State(state, prefix, fn, param_dtype)
  for key in ('input_proj', 'output_proj', 'offset', 'mask'):
    s.linear(getattr(layer, key), key)
  s.depthwise(layer.dw_conv, 'dw_conv.0')
  layer.norm.scale[...] = s.get('dw_conv.1.1.weight', (channels,))
  layer.norm.bias[...] = s.get('dw_conv.1.1.bias', (channels,))
  if cfs:
    s.gate(layer.center_feature_scale_proj, 'center_feature_scale_proj')
  s.check_all_used()
  return layer


def from_dcnv4(state: Mapping[str, np.ndarray], *, groups: int, kernel_size: int = 3, padding: int | None = None,
               dilation: int = 1, offset_scale: float = 1.0, remove_center: bool = False, prefix: str = '',
               param_dtype: DTypeLike = np.float32) -> DCNv4:
  """A `DCNv4` reproducing OpenGVLab's `DCNv4` module (`DCNv4_op/DCNv4/modules/dcnv4.py`).

  Args:
    state: the module's `state_dict()` as numpy arrays: `offset_mask` (`nn.Linear` to
      `ceil8(groups*K*3)`), `value_proj` / `output_proj` (absent with `without_pointwise`;
      `output_proj.bias` absent with `output_bias=False`), `offset_mask_dw` (with
      `dw_kernel_size`), `center_feature_scale_proj_{weight, bias}`; under `prefix`.
    groups, kernel_size, padding, dilation, offset_scale, remove_center: the module's `group`,
      `kernel_size`, `pad`, `dilation`, `offset_scale`, `remove_center` (the rest is read
      from the weights).

  Returns:
    A `DCNv4` whose output on `x [N, H, W, C]` equals the PyTorch module's on
    `x.reshape(N, H*W, C)` with `shape=(H, W)`, reshaped back.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> c, rng = 32, np.random.default_rng(0)
    >>> state = {'value_proj.weight': rng.normal(size=(c, c)), 'value_proj.bias': np.zeros(c),
    ...          'output_proj.weight': rng.normal(size=(c, c)), 'output_proj.bias': np.zeros(c),
    ...          'offset_mask.weight': np.zeros((56, c)), 'offset_mask.bias': np.zeros(56)}
    >>> layer = convert.from_dcnv4(state, groups=2)
    >>> layer(np.ones((1, 6, 6, c), np.float32)).shape
    (1, 6, 6, 32)
  """
  fn = 'from_dcnv4'
  channels = _channels(state, prefix + 'offset_mask.weight', fn)
  dw_key = prefix + 'offset_mask_dw.weight'
  dw = int(np.shape(state[dw_key])[-1]) if dw_key in state else None
  pointwise = prefix + 'value_proj.weight' in state
  layer = DCNv4(channels, kernel_size, groups=groups, padding=padding, kernel_dilation=dilation,
                offset_scale=offset_scale, dw_kernel_size=dw,
                center_feature_scale=prefix + 'center_feature_scale_proj_weight' in state,
                remove_center=remove_center, output_bias=prefix + 'output_proj.bias' in state,
                without_pointwise=not pointwise, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  s = _State(state, prefix, fn, param_dtype)
  s.linear(layer.offset_mask, 'offset_mask')
  if pointwise:
    s.linear(layer.value_proj, 'value_proj')
    s.linear(layer.output_proj, 'output_proj')
  if dw is not None:
    s.depthwise(layer.offset_mask_dw, 'offset_mask_dw')
  if layer.center_feature_scale_proj is not None:
    s.gate(layer.center_feature_scale_proj, 'center_feature_scale_proj')
  s.check_all_used()
  return layer


def from_deformable_detr(state: Mapping[str, np.ndarray], *, num_heads: int, num_levels: int, num_points: int,
                         prefix: str = '', param_dtype: DTypeLike = np.float32) -> MSDeformAttn:
  """An `MSDeformAttn` reproducing transformers' `DeformableDetrMultiscaleDeformableAttention`
  or mmcv's `MultiScaleDeformableAttention` (the same four `nn.Linear`s).

  Args:
    state: the module's `state_dict()` as numpy arrays: `sampling_offsets`,
      `attention_weights`, `value_proj`, `output_proj` (weight and bias each), under
      `prefix` (e.g. `'model.encoder.layers.0.self_attn.'` for a whole Deformable DETR).
    num_heads, num_levels, num_points: the module's `n_heads`, `n_levels`, `n_points`
      (transformers: `encoder_attention_heads`, `num_feature_levels`, `encoder_n_points`).

  Returns:
    An `MSDeformAttn`: `layer(hidden_states + position_embeddings, reference_points,
    encoder_hidden_states, spatial_shapes, padding_mask=~attention_mask)` equals the
    module's first output.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> d, m, l, p, rng = 32, 4, 2, 3, np.random.default_rng(0)
    >>> state = {'sampling_offsets.weight': np.zeros((m * l * p * 2, d)), 'sampling_offsets.bias': np.zeros(48),
    ...          'attention_weights.weight': np.zeros((m * l * p, d)), 'attention_weights.bias': np.zeros(24),
    ...          'value_proj.weight': rng.normal(size=(d, d)), 'value_proj.bias': np.zeros(d),
    ...          'output_proj.weight': rng.normal(size=(d, d)), 'output_proj.bias': np.zeros(d)}
    >>> layer = convert.from_deformable_detr(state, num_heads=m, num_levels=l, num_points=p)
    >>> layer.sampling_offsets.kernel.shape
    (32, 48)
  """
  fn = 'from_deformable_detr'
  d_model = _channels(state, prefix + 'value_proj.weight', fn)
  layer = MSDeformAttn(d_model, num_heads, num_levels, num_points, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  s = _State(state, prefix, fn, param_dtype)
  for key in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj'):
    s.linear(getattr(layer, key), key)
  s.check_all_used()
  return layer


__all__ = ['from_conv', 'from_deformable_detr', 'from_dcnv4', 'from_internimage_dcnv3', 'from_mmcv',
           'from_torchvision', 'linen_params']
