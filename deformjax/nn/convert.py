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
- Deformable RoI pooling (`from_mmcv_deform_roi_pool`, mmcv's
  `DeformRoIPoolPack` / `ModulatedDeformRoIPoolPack`): mmcv's heads flatten the
  pooled RoI as (C, out_h, out_w) and predict offsets as (dx, dy) planes, ours
  flatten (out_h, out_w, C) and predict (dy, dx) pairs, so the first and last
  layers' weights are permuted; its mask is `sigmoid`, which the RoI layer
  reproduces with `modulation='sigmoid'` (no weight can absorb the factor:
  the mask multiplies the pooled features directly).

The deformable family (`from_internimage_dcnv3`, `from_dcnv4`,
`from_deformable_detr`) needs no re-laying out at all: `DCNv3`, `DCNv4` and
`MSDeformAttn` keep their references' (x, y) offset order, tap order and packed
channels, so a PyTorch `nn.Linear` weight `[out, in]` becomes a kernel by one
transpose and a depthwise `Conv2d` weight `[C, 1, k, k]` by `transpose(2, 3, 1, 0)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.typing import PrecisionLike
from jax.typing import DTypeLike

from deformjax.nn.dcnv3 import DCNv3
from deformjax.nn.dcnv4 import DCNv4
from deformjax.nn.deform_conv import DeformConv
from deformjax.nn.detr_encoder import DeformableDetrEncoder, DeformableDetrEncoderLayer
from deformjax.nn.ms_deform_attn import MSDeformAttn
from deformjax.nn.roi_pool import DeformRoIPool
from deformjax.ops import _args


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
                     offset_groups: int = 1, param_dtype: DTypeLike = np.float32,
                     **module_kwargs: Any) -> DeformConv:
  """A `DeformConv` holding a torchvision `DeformConv2d`'s weights: offsets (and mask) passed in.

  The geometry arguments carry torchvision's names (`stride` -> `DeformConv(strides=)`, `dilation` ->
  `kernel_dilation`, `groups` -> `feature_group_count`; `offset_groups` is the same).

  Args:
    weight: `DeformConv2d.weight` as numpy, OIHW `[C_out, C_in // groups, kh, kw]`.
    bias: `DeformConv2d.bias` or None.
    stride, padding, dilation, groups: the module's (int or pair each).
    offset_groups: torchvision infers it from the offsets at call time; set it
      to what your offsets carry (`offset.shape[1] // (2*kh*kw)`).
    param_dtype: the parameters' dtype.
    module_kwargs: the module's own options, which a checkpoint does not hold (`dtype`, `precision`,
      `chunk_size`, `memory_budget`, `deterministic`, ...), passed to its constructor.

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
                     predict_offsets=False, param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs)
  layer.kernel[...] = np.transpose(weight, (2, 3, 1, 0)).astype(param_dtype)
  if bias is not None:
    layer.bias[...] = np.asarray(bias, param_dtype)
  return layer


def from_mmcv(state: Mapping[str, np.ndarray], *, strides: int | Sequence[int] | None = None,
              padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
              deform_groups: int = 1, prefix: str = '', param_dtype: DTypeLike = np.float32,
              stride: int | Sequence[int] | None = None, **module_kwargs: Any) -> DeformConv:
  """A `DeformConv` reproducing an mmcv `ModulatedDeformConv2dPack` (DCNv2) or `DeformConv2dPack` (DCNv1).

  The geometry arguments, side by side (mmcv's constructor, this function, the returned `DeformConv`):

  ================  ========================  ======================
  mmcv              `from_mmcv`               `DeformConv`
  ================  ========================  ======================
  `stride`          `strides` (or `stride`)   `strides`
  `padding`         `padding`                 `padding`
  `dilation`        `dilation`                `kernel_dilation`
  `groups`          `groups`                  `feature_group_count`
  `deform_groups`   `deform_groups`           `offset_groups`
  ================  ========================  ======================

  `strides` is the module's name; `stride`, mmcv's spelling, is accepted too, so that
  the keyword arguments of an mmcv constructor call (`stride=2, padding=1,
  deform_groups=1`) carry over as they stand. Pass one of the two.

  Args:
    state: the module's `state_dict()` entries as numpy arrays: `weight`,
      optional `bias`, `conv_offset.weight`, `conv_offset.bias` (under `prefix`,
      e.g. `'layer4.0.conv2.'` for a whole-network state dict).
    strides: the module's stride (int or pair; default 1).
    padding, dilation, groups, deform_groups: the module's.
    prefix: the module's prefix in `state`.
    param_dtype: the parameters' dtype.
    stride: mmcv's name for `strides`.
    module_kwargs: the module's own options, which a checkpoint does not hold (`dtype`, `precision`,
      `chunk_size`, `memory_budget`, `deterministic`, ...), passed to its constructor.

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
  if strides is not None and stride is not None:
    raise TypeError(f'from_mmcv: pass strides (DeformConv\'s name) or stride (mmcv\'s), not both; got strides='
                    f'{strides!r}, stride={stride!r}')
  strides = 1 if strides is None and stride is None else strides if strides is not None else stride

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
  layer = DeformConv(cin_g * groups, cout, (kh, kw), strides, padding=padding, kernel_dilation=dilation,
                     feature_group_count=groups, offset_groups=deform_groups, use_bias=bias is not None,
                     modulated=modulated, param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs)
  kernel = np.transpose(weight, (2, 3, 1, 0))
  layer.kernel[...] = (kernel / 2 if modulated else kernel).astype(param_dtype)
  if bias is not None:
    layer.bias[...] = bias.astype(param_dtype)
  layer.offset_conv.kernel[...] = np.transpose(off_w, (2, 3, 1, 0)).astype(param_dtype)
  layer.offset_conv.bias[...] = off_b.astype(param_dtype)
  return layer


def from_mmcv_deform_roi_pool(state: Mapping[str, np.ndarray], *, output_size: int | Sequence[int],
                              spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                              prefix: str = '', param_dtype: DTypeLike = np.float32, dtype: DTypeLike | None = None,
                              precision: PrecisionLike = None, max_sampling_grid: int | tuple[int, int] | None = None,
                              chunk_size: int | None = None, memory_budget: int | None = None,
                              deterministic: bool = False) -> DeformRoIPool:
  """A `DeformRoIPool` reproducing an mmcv `DeformRoIPoolPack` or `ModulatedDeformRoIPoolPack`.

  Which pack it is comes from the keys (`mask_fc.*` present: the modulated
  one), as `from_mmcv` tells DCNv1 from DCNv2; `output_channels` and
  `deform_fc_channels` are read from the weights. What differs from mmcv, and
  what loading does about it:

  - mmcv's FC heads read the pooled RoI flattened as `(C, out_h, out_w)` (NCHW),
    `DeformRoIPool`'s as `(out_h, out_w, C)`: the input columns of `offset_fc.0`
    and `mask_fc.0` are permuted.
  - mmcv's `offset_fc` output is viewed as `[R, 2, out_h, out_w]` with channel 0
    = dx, `DeformRoIPool`'s as `[R, out_h, out_w, 2]` with (dy, dx): the rows of
    `offset_fc.4` are permuted.
  - mmcv's mask is `sigmoid(logits)`: the layer is built with
    `modulation='sigmoid'` (not the default `2*sigmoid`).
  - mmcv's boxes are always half-pixel aligned: `aligned=True`.

  Args:
    state: the module's `state_dict()` as numpy arrays (`{k: v.numpy() for k, v in sd.items()}`):
      `offset_fc.0`, `offset_fc.2`, `offset_fc.4` (the `nn.Linear`s of its
      `nn.Sequential`, weight and bias each) and, for `ModulatedDeformRoIPoolPack`,
      `mask_fc.0`, `mask_fc.2`; under `prefix` (e.g. `'roi_head.bbox_roi_extractor.roi_layers.0.'`).
      Entries outside `prefix` are ignored; any other entry under it is refused.
    output_size, spatial_scale, sampling_ratio, gamma: the pack's constructor
      arguments (mmcv's defaults).
    prefix: the module's prefix in `state`.
    param_dtype: the parameters' dtype.
    dtype, precision, max_sampling_grid, chunk_size, memory_budget, deterministic:
      as `DeformRoIPool` (how it computes, not what).

  Returns:
    A `DeformRoIPool` whose `layer(features, rois)` equals the pack's
    `forward(features_nchw, rois)` transposed by `(0, 2, 3, 1)`, for
    `features = features_nchw.transpose(0, 2, 3, 1)` and the same `rois [R, 5]`
    (batch_index, x1, y1, x2, y2).

  Raises:
    ValueError: naming a missing, wrongly shaped or unknown entry.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> c, f, rng = 8, 16, np.random.default_rng(0)  # DeformRoIPoolPack(output_size=3, output_channels=8,
    >>> state = {'offset_fc.0.weight': rng.normal(size=(f, c * 9)), 'offset_fc.0.bias': np.zeros(f),  #   16)
    ...          'offset_fc.2.weight': rng.normal(size=(f, f)), 'offset_fc.2.bias': np.zeros(f),
    ...          'offset_fc.4.weight': np.zeros((18, f)), 'offset_fc.4.bias': np.zeros(18)}
    >>> pool = convert.from_mmcv_deform_roi_pool(state, output_size=3, spatial_scale=0.5)
    >>> pool.modulated, pool(np.ones((1, 12, 12, c), np.float32), np.array([[0, 2.0, 2.0, 20.0, 16.0]])).shape
    (False, (1, 3, 3, 8))
  """
  fn = 'from_mmcv_deform_roi_pool'
  oh, ow = _args.positive_pair(output_size, 'output_size', fn)
  bins = oh * ow
  first = prefix + 'offset_fc.0.weight'
  flat = _channels(state, first, fn)
  hidden = int(np.shape(state[first])[0])
  if flat % bins:
    raise ValueError(f'{fn}: {first!r} reads {flat} features, which is not output_size {oh}x{ow} = {bins} bins '
                     'times a channel count (is output_size the pack\'s?)')
  channels = flat // bins
  modulated = any(k.startswith(prefix + 'mask_fc.') for k in state)
  # Built abstract: every parameter is overwritten below.
  layer = nnx.eval_shape(lambda: DeformRoIPool(
      channels, (oh, ow), spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma, aligned=True,
      max_sampling_grid=max_sampling_grid, hidden_features=(hidden, hidden), modulated=modulated,
      modulation='sigmoid', dtype=dtype, param_dtype=param_dtype, precision=precision, chunk_size=chunk_size,
      memory_budget=memory_budget, deterministic=deterministic, rngs=nnx.Rngs(0)))
  s = _State(state, prefix, fn, param_dtype)

  def reads_pooled(module: nnx.Linear, key: str) -> None:
    """A first FC layer: mmcv's columns (C, out_h, out_w) reordered to (out_h, out_w, C)."""
    weight = s.get(f'{key}.weight', (hidden, flat)).reshape(hidden, channels, oh, ow)
    _assign(module.kernel, weight.transpose(0, 2, 3, 1).reshape(hidden, flat).T)
    _assign(module.bias, s.get(f'{key}.bias', (hidden,)))

  reads_pooled(layer.offset_hidden[0], 'offset_fc.0')
  s.linear(layer.offset_hidden[1], 'offset_fc.2')
  # mmcv's rows (2, out_h, out_w) with channel 0 = dx become (out_h, out_w, 2) with (dy, dx): flip, then move.
  weight = s.get('offset_fc.4.weight', (2 * bins, hidden)).reshape(2, oh, ow, hidden)[::-1]
  _assign(layer.offset_out.kernel, weight.transpose(1, 2, 0, 3).reshape(2 * bins, hidden).T)
  bias = s.get('offset_fc.4.bias', (2 * bins,)).reshape(2, oh, ow)[::-1]
  _assign(layer.offset_out.bias, bias.transpose(1, 2, 0).reshape(2 * bins))
  if modulated:
    reads_pooled(layer.mask_hidden, 'mask_fc.0')
    s.linear(layer.mask_out, 'mask_fc.2')  # its rows (out_h, out_w) are already the mask's order
  s.check_all_used(hint='check output_size and the prefix')
  _check_concrete(layer, fn)
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
    _assign(module.kernel, self.get(f'{key}.weight', (module.out_features, module.in_features)).T)
    if module.bias is not None:
      _assign(module.bias, self.get(f'{key}.bias', (module.out_features,)))

  def depthwise(self, module: nnx.Conv, key: str) -> None:
    """Depthwise `Conv2d` `key.weight [C, 1, k, k]` -> HWIO `[k, k, 1, C]`."""
    kh, kw, _, c = module.kernel.shape
    module.kernel[...] = self.get(f'{key}.weight', (c, 1, kh, kw)).transpose(2, 3, 1, 0)
    module.bias[...] = self.get(f'{key}.bias', (c,))

  def gate(self, module: nnx.Linear, key: str) -> None:
    """`center_feature_scale_proj_weight [groups, C]` / `_bias [groups]` (bare parameters, not an nn.Linear)."""
    module.kernel[...] = self.get(f'{key}_weight', (module.out_features, module.in_features)).T
    module.bias[...] = self.get(f'{key}_bias', (module.out_features,))

  def check_all_used(self, hint: str = 'check groups, kernel_size, remove_center and the prefix') -> None:
    left = sorted(k for k in self.state if k.startswith(self.prefix) and k not in self.used)
    if left:
      raise ValueError(f'{self.fn}: state entries the layer has no parameter for: {left[:8]} (a different '
                       f'configuration? {hint})')


def _channels(state: Mapping[str, np.ndarray], key: str, fn: str) -> int:
  if key not in state:
    raise ValueError(f'{fn}: state has no {key!r}; keys: {sorted(state)[:8]}...')
  weight = np.asarray(state[key])
  if weight.ndim != 2:
    raise ValueError(f'{fn}: {key!r} must be an nn.Linear weight [out, in], got shape {weight.shape}')
  return int(weight.shape[1])


def from_internimage_dcnv3(state: Mapping[str, np.ndarray], *, groups: int, kernel_size: int = 3,
                           padding: int | None = None, dilation: int = 1, offset_scale: float = 1.0,
                           remove_center: bool = False, prefix: str = '', param_dtype: DTypeLike = np.float32,
                           **module_kwargs: Any) -> DCNv3:
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
    prefix, param_dtype: the module's prefix in `state`; the parameters' dtype.
    module_kwargs: the module's own options, which a checkpoint does not hold (`dtype`, `precision`,
      `chunk_size`, `memory_budget`, `deterministic`, ...), passed to its constructor.

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
                remove_center=remove_center, param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs)
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
               param_dtype: DTypeLike = np.float32, **module_kwargs: Any) -> DCNv4:
  """A `DCNv4` reproducing OpenGVLab's `DCNv4` module (`DCNv4_op/DCNv4/modules/dcnv4.py`).

  Args:
    state: the module's `state_dict()` as numpy arrays: `offset_mask` (`nn.Linear` to
      `ceil8(groups*K*3)`), `value_proj` / `output_proj` (absent with `without_pointwise`;
      `output_proj.bias` absent with `output_bias=False`), `offset_mask_dw` (with
      `dw_kernel_size`), `center_feature_scale_proj_{weight, bias}`; under `prefix`.
    groups, kernel_size, padding, dilation, offset_scale, remove_center: the module's `group`,
      `kernel_size`, `pad`, `dilation`, `offset_scale`, `remove_center` (the rest is read
      from the weights).
    prefix, param_dtype: the module's prefix in `state`; the parameters' dtype.
    module_kwargs: the module's own options, which a checkpoint does not hold (`dtype`, `precision`,
      `chunk_size`, `memory_budget`, `deterministic`, ...), passed to its constructor.

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
                without_pointwise=not pointwise, param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs)
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


def _assign(variable: nnx.Variable, value: np.ndarray) -> None:
  """Sets a parameter, also one of an abstract module (`nnx.eval_shape`), which holds no array to write into."""
  variable.set_value(jnp.asarray(value))


def from_deformable_detr(state: Mapping[str, np.ndarray], *, num_heads: int, num_levels: int, num_points: int,
                         prefix: str = '', param_dtype: DTypeLike = np.float32,
                         **module_kwargs: Any) -> MSDeformAttn:
  """An `MSDeformAttn` reproducing transformers' `DeformableDetrMultiscaleDeformableAttention`
  or mmcv's `MultiScaleDeformableAttention` (the same four `nn.Linear`s).

  `MSDeformAttn` is batch-first (`[N, Lq, C]`) and returns the attention output
  alone, as transformers' layer does. mmcv's layer differs in ways the weights
  do not show, which the caller reproduces around the returned layer:

  - it is sequence-first by default (`batch_first=False`: query `[Lq, N, C]`,
    value `[S, N, C]`, output `[Lq, N, C]`): transpose in and out by `(1, 0, 2)`;
  - it returns `dropout(out) + identity`, `identity` defaulting to the query
    before `query_pos` is added: add that residual (in eval mode dropout is the
    identity; to train as mmcv does, apply `nnx.Dropout` to the layer's output
    before adding it);
  - `value=None` attends to the query itself, before `query_pos` is added: pass
    that as `inputs`.

  In mmcv's terms, with `t = lambda a: a.transpose(1, 0, 2)` (omit it for
  `batch_first=True`): `identity + t(layer(t(query + query_pos),
  reference_points, t(value), spatial_shapes, padding_mask=key_padding_mask))`.
  mmcv's `value_proj_ratio` makes `value_proj` map `embed_dims ->
  int(embed_dims * value_proj_ratio)` and `output_proj` map it back: that width
  is read from `value_proj.weight` and becomes `MSDeformAttn(value_features=)`.

  Args:
    state: the module's `state_dict()` as numpy arrays: `sampling_offsets`,
      `attention_weights`, `value_proj`, `output_proj` (weight and bias each), under
      `prefix` (e.g. `'model.encoder.layers.0.self_attn.'` for a whole Deformable DETR).
    num_heads, num_levels, num_points: the module's `n_heads`, `n_levels`, `n_points`
      (transformers: `encoder_attention_heads`, `num_feature_levels`, `encoder_n_points`).
    prefix, param_dtype: the module's prefix in `state`; the parameters' dtype.
    module_kwargs: the module's own options, which a checkpoint does not hold (`dtype`, `precision`,
      `chunk_size`, `memory_budget`, `deterministic`, ...), passed to its constructor.

  Returns:
    An `MSDeformAttn`: `layer(hidden_states + position_embeddings, reference_points,
    encoder_hidden_states, spatial_shapes, padding_mask=~attention_mask)` equals the
    module's first output.

  Raises:
    ValueError: naming a missing or wrongly shaped entry, or entries left unused.

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
  value_features = int(np.shape(state[prefix + 'value_proj.weight'])[0])
  if value_features != d_model and value_features % num_heads:
    raise ValueError(f'{fn}: {prefix}value_proj.weight maps d_model={d_model} to {value_features} value '
                     f'channels (mmcv\'s value_proj_ratio={value_features / d_model:g}), which num_heads={num_heads} '
                     'does not divide')
  # Built abstract: every parameter is overwritten below, so initialising them would be wasted work.
  layer = nnx.eval_shape(lambda: MSDeformAttn(d_model, num_heads, num_levels, num_points, value_features=value_features,
                                              param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs))
  s = _State(state, prefix, fn, param_dtype)
  for key in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj'):
    s.linear(getattr(layer, key), key)
  s.check_all_used()
  _check_concrete(layer, fn)
  return layer


def _check_concrete(module: nnx.Module, fn: str) -> None:
  """Every variable of a module built abstract has been given an array (a guard against a missed parameter)."""
  left = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module))
          if isinstance(leaf, jax.ShapeDtypeStruct)]
  if left:
    raise AssertionError(f'{fn}: parameters left unset: {left[:8]}')


def _seed_rng_streams(module: nnx.Module, seed: int = 0) -> None:
  """Concrete dropout streams for a module built abstract: one key per stream, folded from `seed`."""
  base = jax.random.key(seed)
  for i, (_, node) in enumerate(nnx.iter_graph(module)):
    if isinstance(node, nnx.RngKey):
      node.set_value(jax.random.fold_in(base, i))
    elif isinstance(node, nnx.RngCount):
      node.set_value(jnp.zeros((), jnp.uint32))


# Parts of a transformers `DeformableDetrModel` state dict that are not the encoder's.
_DETR_NOT_ENCODER = ('backbone.', 'decoder.', 'query_position_embeddings.', 'reference_points.', 'enc_output.',
                     'enc_output_norm.', 'pos_trans.', 'pos_trans_norm.')
# The learned position embedding (`position_embedding_type='learned'`; `backbone.position_embedding.` before v5).
_DETR_LEARNED_POSITIONS = ('position_embedding.', 'backbone.position_embedding.')

_ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = MappingProxyType({
    'relu': jax.nn.relu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
})


def _indices(keys: Sequence[str], head: str) -> list[int]:
  """The sorted integers `i` of keys `head{i}.…`."""
  found = {int(k[len(head):].split('.', 1)[0]) for k in keys
           if k.startswith(head) and k[len(head):].split('.', 1)[0].isdigit()}
  return sorted(found)


class _DetrEncoderConfig(NamedTuple):
  """The encoder's architecture as `from_deformable_detr_encoder` reads it off a state dict's shapes."""
  keys: tuple[str, ...]  # the entries under the prefix, prefix removed, sorted
  d_model: int
  conv_shapes: tuple[tuple[int, ...], ...]  # `input_proj.{l}.0.weight` per level, OIHW
  num_backbone: int  # the leading 1x1 convs; the 3x3 stride-2 extra levels follow
  num_layers: int
  ffn_features: int
  mlp: str  # where fc1 / fc2 live: 'mlp.' (transformers v5) or '' (before)

  @property
  def num_levels(self) -> int:
    return len(self.conv_shapes)

  @property
  def in_features(self) -> tuple[int, ...]:
    return tuple(int(shape[1]) for shape in self.conv_shapes[:self.num_backbone])


def _detr_encoder_keys(state: Mapping[str, np.ndarray], prefix: str, fn: str) -> tuple[str, ...]:
  """The sorted keys under `prefix` (prefix removed), refusing a state with learned position embeddings or without
  `level_embed` (with a hint when the prefix looks one level too shallow)."""
  keys = tuple(sorted(k[len(prefix):] for k in state if k.startswith(prefix)))
  learned = [prefix + k for k in keys if k.startswith(_DETR_LEARNED_POSITIONS)]
  if learned:
    raise ValueError(f'{fn}: {learned[:2]} are learned position embeddings (position_embedding_type=\'learned\'); '
                     'only the sine position embedding is supported')
  if 'level_embed' not in keys:
    hint = (" (a DeformableDetrForObjectDetection state dict? pass prefix='model.')"
            if any(k.startswith(prefix + 'model.') for k in state) else '')
    raise ValueError(f'{fn}: state has no {prefix + "level_embed"!r}{hint}; keys: {sorted(state)[:8]}...')
  return keys


def _detr_input_proj_shapes(state: Mapping[str, np.ndarray], prefix: str, num_levels: int, d_model: int,
                            fn: str) -> tuple[tuple[tuple[int, ...], ...], int]:
  """The `num_levels` input-projection conv shapes (OIHW) and how many lead as backbone levels.

  Each is `[d_model, C, 1, 1]` (a backbone map's) or `[d_model, C, 3, 3]` (an extra
  stride-2 level's); the 1x1 convs come first, the first extra level reads the
  last backbone map, and every later one the previous level (`C = d_model`).
  """
  shapes = []
  for level in range(num_levels):
    key = f'{prefix}input_proj.{level}.0.weight'
    if key not in state:
      raise ValueError(f'{fn}: state has no {key!r} (level_embed has {num_levels} levels)')
    shape = np.shape(state[key])
    if len(shape) != 4 or shape[0] != d_model or shape[2:] not in ((1, 1), (3, 3)):
      raise ValueError(f'{fn}: {key!r} must be a [d_model={d_model}, C, 1, 1] or [d_model, C, 3, 3] '
                       f'Conv2d weight, got shape {shape}')
    shapes.append(tuple(shape))
  num_backbone = sum(1 for shape in shapes if shape[2] == 1)
  if any(shape[2] == 1 for shape in shapes[num_backbone:]) or num_backbone == 0:
    raise ValueError(f'{fn}: input_proj must be 1x1 convs (backbone levels) followed by 3x3 convs (extra levels), '
                     f'got kernels {[shape[2] for shape in shapes]}')
  if num_backbone < num_levels and shapes[num_backbone][1] != shapes[num_backbone - 1][1]:
    raise ValueError(f'{fn}: input_proj.{num_backbone}.0.weight, the first extra level, must read the last backbone '
                     f'map ({shapes[num_backbone - 1][1]} channels, as input_proj.{num_backbone - 1}), got shape '
                     f'{shapes[num_backbone]}')
  for level in range(num_backbone + 1, num_levels):
    if shapes[level][1] != d_model:
      raise ValueError(f'{fn}: input_proj.{level}.0.weight must read the previous extra level '
                       f'(d_model={d_model} channels), got shape {shapes[level]}')
  return tuple(shapes), num_backbone


def _detr_encoder_config(state: Mapping[str, np.ndarray], prefix: str, fn: str) -> _DetrEncoderConfig:
  """`d_model` and the levels from `level_embed [L, d_model]` and `input_proj`, the layers and `encoder_ffn_dim`
  from `encoder.layers.{j}.…`, each refused by name when missing or misshapen."""
  keys = _detr_encoder_keys(state, prefix, fn)
  level_embed_shape = np.shape(state[prefix + 'level_embed'])
  if len(level_embed_shape) != 2:
    raise ValueError(f'{fn}: {prefix}level_embed must have shape [num_feature_levels, d_model], got '
                     f'{level_embed_shape}')
  num_levels, d_model = (int(v) for v in level_embed_shape)
  conv_shapes, num_backbone = _detr_input_proj_shapes(state, prefix, num_levels, d_model, fn)
  layers = _indices(keys, 'encoder.layers.')
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f'{fn}: state must hold encoder.layers.0 ... encoder.layers.J-1 under {prefix!r}, got indices '
                     f'{layers}')
  mlp = 'mlp.' if 'encoder.layers.0.mlp.fc1.weight' in keys else ''
  ffn_features = _channels(state, f'{prefix}encoder.layers.0.{mlp}fc2.weight', fn)
  return _DetrEncoderConfig(keys, d_model, conv_shapes, num_backbone, len(layers), ffn_features, mlp)


def _load_detr_input_proj(encoder: DeformableDetrEncoder, s: _State, config: _DetrEncoderConfig) -> None:
  """`input_proj.{l}.0` (Conv2d, OIHW -> HWIO) and `.1` (GroupNorm) of every level, and `level_embed`."""
  d = config.d_model
  for level, (conv, norm) in enumerate(zip(encoder.input_convs, encoder.input_norms)):
    _assign(conv.kernel, s.get(f'input_proj.{level}.0.weight', config.conv_shapes[level]).transpose(2, 3, 1, 0))
    _assign(conv.bias, s.get(f'input_proj.{level}.0.bias', (d,)))
    _assign(norm.scale, s.get(f'input_proj.{level}.1.weight', (d,)))
    _assign(norm.bias, s.get(f'input_proj.{level}.1.bias', (d,)))
  _assign(encoder.level_embed, s.get('level_embed', (config.num_levels, d)))


def _load_detr_encoder_layer(layer: DeformableDetrEncoderLayer, s: _State, j: int, config: _DetrEncoderConfig, *,
                             num_heads: int, num_points: int) -> None:
  """`encoder.layers.{j}`: its attention (`from_deformable_detr`, parameters only: the layer keeps its own
  execution policy), both LayerNorms and the FFN."""
  head = f'encoder.layers.{j}.'
  attn = from_deformable_detr(s.state, num_heads=num_heads, num_levels=config.num_levels, num_points=num_points,
                              prefix=s.prefix + head + 'self_attn.', param_dtype=s.dtype)
  nnx.update(layer.self_attn, nnx.state(attn))
  s.used.update(s.prefix + k for k in config.keys if k.startswith(head + 'self_attn.'))
  for norm, key in ((layer.self_attn_layer_norm, 'self_attn_layer_norm'), (layer.final_layer_norm,
                                                                           'final_layer_norm')):
    _assign(norm.scale, s.get(f'{head}{key}.weight', (config.d_model,)))
    _assign(norm.bias, s.get(f'{head}{key}.bias', (config.d_model,)))
  s.linear(layer.fc1, f'{head}{config.mlp}fc1')
  s.linear(layer.fc2, f'{head}{config.mlp}fc2')


def from_deformable_detr_encoder(state: Mapping[str, np.ndarray], *, num_heads: int, num_points: int,
                                 num_groups: int = 32, activation_function: str = 'relu', dropout: float = 0.1,
                                 activation_dropout: float = 0.0, layer_norm_epsilon: float = 1e-5,
                                 group_norm_epsilon: float = 1e-5, prefix: str = '',
                                 param_dtype: DTypeLike = np.float32, chunk_size: int | None = None,
                                 memory_budget: int | None = None,
                                 deterministic_gradients: bool = False) -> DeformableDetrEncoder:
  """A `DeformableDetrEncoder` reproducing transformers' `DeformableDetrModel` from its backbone's feature maps
  to `encoder_last_hidden_state`.

  The architecture is read from the weights: `d_model` and `num_levels` from
  `level_embed [L, d_model]`, the backbone widths and the extra stride-2 levels
  from `input_proj.{l}.0.weight` (1x1 then 3x3 kernels), the layers and
  `encoder_ffn_dim` from `encoder.layers.{j}.…`.

  Args:
    state: the model's `state_dict()` as numpy arrays (`{k: v.numpy() for k, v in sd.items()}`),
      under `prefix` (`'model.'` for a `DeformableDetrForObjectDetection`, whose heads
      outside the prefix are ignored). Read: `input_proj.{l}.0` (Conv2d) and `.1`
      (GroupNorm), `level_embed`, and per layer `encoder.layers.{j}.self_attn.*`
      (`from_deformable_detr`), `self_attn_layer_norm`, `mlp.fc1` / `mlp.fc2`
      (`fc1` / `fc2` before transformers v5), `final_layer_norm`. Ignored, as not
      the encoder's: `backbone.*` (the backbone's own weights; its maps are the
      input), `decoder.*`, `query_position_embeddings.*`, `reference_points.*`
      and the two-stage `enc_output.*`, `enc_output_norm.*`, `pos_trans.*`,
      `pos_trans_norm.*`. Any other entry is refused by name, and so are the learned
      position embeddings (`position_embedding.*`: only the sine embedding is supported).
    num_heads, num_points: the config's `encoder_attention_heads`, `encoder_n_points`.
    num_groups: the input projection's GroupNorm groups (transformers fixes 32).
    activation_function: the config's (`'relu'`, `'gelu'`, `'gelu_new'`, `'silu'`, ...).
    dropout, activation_dropout: the config's, used only when the encoder runs
      non-deterministically (the encoder is returned deterministic, as a model in eval mode).
    layer_norm_epsilon, group_norm_epsilon: PyTorch's defaults.
    param_dtype: the parameters' dtype.
    chunk_size, memory_budget, deterministic_gradients: the execution policy of every layer's attention, as
      `DeformableDetrEncoder` takes it (queries per pass or a byte budget for one pass; bit-identical gradients
      run to run on GPU/TPU). They change how the ported encoder runs, not what it computes.

  Returns:
    A deterministic `DeformableDetrEncoder` with that policy: `enc(features, pixel_mask).last_hidden_state`
    equals the model's `encoder_last_hidden_state` for backbone maps `features`
    (NHWC, the model's NCHW maps transposed by `(0, 2, 3, 1)`).

  Raises:
    ValueError: naming a missing, unknown or wrongly shaped entry, or a `chunk_size` / `memory_budget` that is
      not a positive int or None.
    TypeError: naming a `deterministic_gradients` that is not a bool.

  Example:
    >>> import numpy as np
    >>> from deformjax.nn import convert
    >>> from deformjax.nn.detr_encoder import DeformableDetrEncoder
    >>> from flax import nnx
    >>> enc = DeformableDetrEncoder([8], 32, num_heads=2, num_levels=2, num_points=2, num_layers=1,
    ...                             ffn_features=64, rngs=nnx.Rngs(0))
    >>> state = {k: np.asarray(v) for k, v in convert.deformable_detr_encoder_state(enc).items()}
    >>> ported = convert.from_deformable_detr_encoder(state, num_heads=2, num_points=2)
    >>> ported.in_features, ported.num_levels, len(ported.layers)
    ((8,), 2, 1)
  """
  fn = 'from_deformable_detr_encoder'
  activation = _ACTIVATIONS.get(activation_function)
  if activation is None:
    raise ValueError(f'{fn}: activation_function must be one of {sorted(_ACTIVATIONS)}, got {activation_function!r}')
  # Refused here, under the converter's name, before any weight is read (the encoder would refuse them as its own).
  _args.check_policy(chunk_size, memory_budget, False, fn)
  _args.check_bool(deterministic_gradients, 'deterministic_gradients', fn)
  config = _detr_encoder_config(state, prefix, fn)
  # Built abstract: every parameter is overwritten below, so initialising them would be wasted work.
  encoder = nnx.eval_shape(lambda: DeformableDetrEncoder(
      config.in_features, config.d_model, num_heads=num_heads, num_levels=config.num_levels, num_points=num_points,
      num_layers=config.num_layers, ffn_features=config.ffn_features, num_groups=num_groups, dropout=dropout,
      activation_dropout=activation_dropout, activation=activation, layer_norm_epsilon=layer_norm_epsilon,
      group_norm_epsilon=group_norm_epsilon, deterministic=True, deterministic_gradients=deterministic_gradients,
      chunk_size=chunk_size, memory_budget=memory_budget, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  s = _State(state, prefix, fn, param_dtype)
  _load_detr_input_proj(encoder, s, config)
  for j, layer in enumerate(encoder.layers):
    _load_detr_encoder_layer(layer, s, j, config, num_heads=num_heads, num_points=num_points)
  unknown = sorted(prefix + k for k in config.keys
                   if prefix + k not in s.used and not k.startswith(_DETR_NOT_ENCODER))
  if unknown:
    raise ValueError(f'{fn}: state entries the encoder has no parameter for: {unknown[:8]} (a different '
                     'configuration or model? check the prefix)')
  _seed_rng_streams(encoder)
  _check_concrete(encoder, fn)
  return encoder


def deformable_detr_encoder_state(encoder: DeformableDetrEncoder) -> dict[str, np.ndarray]:
  """The inverse of `from_deformable_detr_encoder`: the encoder's parameters under transformers' (v5) names.

  Returns:
    `{name: array}` with `input_proj.{l}.0/1.*`, `level_embed` and `encoder.layers.{j}.*` in PyTorch
    layouts (`[out, in]` linears, OIHW convs), e.g. to load into a `DeformableDetrModel`
    with `load_state_dict(..., strict=False)` after `torch.from_numpy`.

  Example:
    >>> from flax import nnx
    >>> from deformjax.nn import DeformableDetrEncoder, convert
    >>> enc = DeformableDetrEncoder([8], 32, num_heads=2, num_levels=1, num_points=2, num_layers=1,
    ...                             ffn_features=64, rngs=nnx.Rngs(0))
    >>> state = convert.deformable_detr_encoder_state(enc)
    >>> state['input_proj.0.0.weight'].shape, state['encoder.layers.0.mlp.fc1.weight'].shape
    ((32, 8, 1, 1), (64, 32))
  """
  if not isinstance(encoder, DeformableDetrEncoder):
    raise TypeError(f'deformable_detr_encoder_state: encoder must be a DeformableDetrEncoder, got '
                    f'{type(encoder).__name__}')
  out: dict[str, np.ndarray] = {}

  def linear(module: nnx.Linear, key: str) -> None:
    out[f'{key}.weight'] = np.asarray(module.kernel[...]).T
    out[f'{key}.bias'] = np.asarray(module.bias[...])

  def norm(module: nnx.LayerNorm | nnx.GroupNorm, key: str) -> None:
    out[f'{key}.weight'] = np.asarray(module.scale[...])
    out[f'{key}.bias'] = np.asarray(module.bias[...])

  for level, (conv, gn) in enumerate(zip(encoder.input_convs, encoder.input_norms)):
    out[f'input_proj.{level}.0.weight'] = np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1)
    out[f'input_proj.{level}.0.bias'] = np.asarray(conv.bias[...])
    norm(gn, f'input_proj.{level}.1')
  out['level_embed'] = np.asarray(encoder.level_embed[...])
  for j, layer in enumerate(encoder.layers):
    head = f'encoder.layers.{j}.'
    for key in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj'):
      linear(getattr(layer.self_attn, key), f'{head}self_attn.{key}')
    norm(layer.self_attn_layer_norm, f'{head}self_attn_layer_norm')
    linear(layer.fc1, f'{head}mlp.fc1')
    linear(layer.fc2, f'{head}mlp.fc2')
    norm(layer.final_layer_norm, f'{head}final_layer_norm')
  return out


__all__ = ['deformable_detr_encoder_state', 'from_conv', 'from_dcnv4', 'from_deformable_detr',
           'from_deformable_detr_encoder', 'from_internimage_dcnv3', 'from_mmcv', 'from_mmcv_deform_roi_pool', 'from_torchvision',
           'linen_params']
