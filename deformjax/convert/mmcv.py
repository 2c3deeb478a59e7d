"""mmcv's deformable layers into deformjax modules, from their state dicts as numpy arrays (no torch needed).

What differs from mmcv, and what loading does about it:

- Layout: PyTorch weights are OIHW, ours HWIO: `weight.transpose(2, 3, 1, 0)`.
- DCNv2 mask: mmcv's modulated layer uses `sigmoid(logits)`, `DeformConv` `2*sigmoid(logits)` (so that a fresh
  layer equals a conv). The output is linear in the mask, so loading halves the kernel: the result is exactly
  mmcv's (a factor of 2 is exact in floating point); gradients with respect to that kernel differ by the same factor.
- Offsets: mmcv's predictor output is `(o1, o2, mask_logits)` chunks whose `cat(o1, o2)` is torchvision's
  (dy, dx)-per-tap order, which is ours: its weights copy over unchanged.
- Deformable RoI pooling: mmcv's heads flatten the pooled RoI as (C, out_h, out_w) and predict offsets as
  (dx, dy) planes, ours flatten (out_h, out_w, C) and predict (dy, dx) pairs, so the first and last layers' weights
  are permuted; its mask is `sigmoid`, which the RoI layer reproduces with `modulation='sigmoid'` (no weight can
  absorb the factor: the mask multiplies the pooled features directly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from deformjax.convert import _state
from deformjax.nn.deform_conv import DeformConv
from deformjax.nn.roi_pool import DeformRoIPool
from deformjax.ops import _args


def _offset_groups(channels: int, taps: int, in_features: int, offset_groups: int | None, has_bias: bool,
                   fn: str) -> tuple[int, bool]:
  """`(offset_groups, modulated)` from the predictor's output channels, `2*g*taps` (DCNv1) or `3*g*taps` (DCNv2),
  with `g` dividing the input channels."""
  if offset_groups is not None:
    if channels not in (2 * offset_groups * taps, 3 * offset_groups * taps):
      raise ValueError(f'{fn}: conv_offset.weight predicts {channels} channels; with offset_groups={offset_groups} '
                       f'and {taps} taps it must be {2 * offset_groups * taps} (DCNv1) or {3 * offset_groups * taps} '
                       '(DCNv2)')
    return offset_groups, channels == 3 * offset_groups * taps
  readings = [(channels // (k * taps), k == 3) for k in (3, 2)
              if channels % (k * taps) == 0 and in_features % (channels // (k * taps)) == 0]
  if not readings:
    raise ValueError(f'{fn}: conv_offset.weight predicts {channels} channels, not 2 (DCNv1) or 3 (DCNv2) x '
                     f'offset_groups (dividing the {in_features} input channels) x {taps} taps: with one offset group '
                     f'it must be {2 * taps} (DCNv1) or {3 * taps} (DCNv2)')
  if len(readings) == 2 and not has_bias:  # mmcv's DCNv1 layer has no bias: a bias says DCNv2
    raise ValueError(f'{fn}: conv_offset.weight predicts {channels} channels, which is offset_groups={readings[0][0]} '
                     f'for DCNv2 or offset_groups={readings[1][0]} for DCNv1: pass offset_groups= (mmcv\'s '
                     'deform_groups)')
  return readings[0]


def _mmcv_geometry(weight: np.ndarray, off_w: np.ndarray, groups: int | None, fn: str, prefix: str) -> int:
  """The channel groups: `conv_offset` reads every input channel, `weight` `C_in // groups` of them."""
  cin, cin_g = off_w.shape[1], weight.shape[1]
  if cin % cin_g or (groups is not None and groups * cin_g != cin):
    raise ValueError(f'{fn}: {prefix}weight reads {cin_g} channels per group and {prefix}conv_offset.weight {cin}: '
                     f'feature_group_count={groups} does not fit (it must be {cin} // {cin_g})')
  return cin // cin_g


def from_mmcv(state: Mapping[str, np.ndarray], *, strides: int | Sequence[int] | None = None,
              padding: int | Sequence[int] = 0, kernel_dilation: int | Sequence[int] | None = None,
              feature_group_count: int | None = None, offset_groups: int | None = None, prefix: str = '',
              param_dtype: DTypeLike = np.float32, stride: int | Sequence[int] | None = None,
              dilation: int | Sequence[int] | None = None, groups: int | None = None,
              deform_groups: int | None = None, **module_kwargs: Any) -> DeformConv:
  """A `DeformConv` reproducing an mmcv `ModulatedDeformConv2dPack` (DCNv2) or `DeformConv2dPack` (DCNv1).

  Each geometry argument takes `DeformConv`'s name or mmcv's (`stride`, `dilation`, `groups`, `deform_groups`), not
  both, so that the keyword arguments of an mmcv constructor call carry over as they stand. The channel groups and
  the offset groups are read from the weights when not given.

  Args:
    state: the module's `state_dict()` entries as numpy arrays: `weight`, optional `bias`, `conv_offset.weight`,
      `conv_offset.bias`, under `prefix`.
    strides: the stride, an int or a pair (mmcv: `stride`; default 1).
    padding: the zero padding, an int or a pair.
    kernel_dilation: the tap spacing (mmcv: `dilation`; default 1).
    feature_group_count: the channel groups (mmcv: `groups`; read from the weights when None).
    offset_groups: the offset groups (mmcv: `deform_groups`; read from `conv_offset` when None).
    prefix: the module's prefix in `state`, e.g. `'layer4.0.conv2.'` for a whole network's state dict.
    param_dtype: the parameters' dtype.
    stride: mmcv's name for `strides`.
    dilation: mmcv's name for `kernel_dilation`.
    groups: mmcv's name for `feature_group_count`.
    deform_groups: mmcv's name for `offset_groups`.
    **module_kwargs: `DeformConv` options a checkpoint does not hold (`dtype`, `precision`, `chunk_size`, ...).

  Returns:
    A `DeformConv` whose offset predictor holds `conv_offset`; modulated when `conv_offset` predicts
    `3*offset_groups*kh*kw` channels (DCNv2), with the kernel halved so that our `2*sigmoid` mask reproduces
    mmcv's `sigmoid`.

  Raises:
    TypeError: a state that is not a mapping, or an argument given under both its names.
    ValueError: a missing key (naming the `prefix=` when the keys carry one), a nested state, an HWIO weight, or
      channels that no offset-group count explains.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert import from_mmcv
    >>> rng = np.random.default_rng(0)
    >>> state = {'weight': rng.normal(size=(16, 8, 3, 3)), 'bias': np.zeros(16),  # {k: v.numpy() for k, v in
    ...          'conv_offset.weight': np.zeros((27, 8, 3, 3)), 'conv_offset.bias': np.zeros(27)}  # sd.items()}
    >>> layer = from_mmcv(state, stride=2, padding=1)
    >>> layer.modulated, layer.offset_groups, layer(np.ones((1, 6, 6, 8), np.float32)).shape
    (True, 1, (1, 3, 3, 16))
  """
  fn = 'from_mmcv'
  strides = _state.one_of(strides, stride, ('strides', 'stride'), 1, fn)
  kernel_dilation = _state.one_of(kernel_dilation, dilation, ('kernel_dilation', 'dilation'), 1, fn)
  groups = _state.one_of(feature_group_count, groups, ('feature_group_count', 'groups'), None, fn)
  offset_groups = _state.one_of(offset_groups, deform_groups, ('offset_groups', 'deform_groups'), None, fn)
  s = _state.StateReader(state, prefix, fn, param_dtype)
  bias = s.state.get(prefix + 'bias')
  for key in ('weight', 'conv_offset.weight', 'conv_offset.bias'):
    if not s.has(key):
      raise _state.missing_key(s.state, prefix, key, fn)
  fix = 'state entries must be arrays'
  weight = _state.oihw(s.state[prefix + 'weight'], f'{prefix}weight', fn, fix, bias)
  off_w = _state.oihw(s.state[prefix + 'conv_offset.weight'], f'{prefix}conv_offset.weight', fn, fix,
                      s.state[prefix + 'conv_offset.bias'])
  cout, _, kh, kw = weight.shape
  groups = _mmcv_geometry(weight, off_w, groups, fn, prefix)
  offset_groups, modulated = _offset_groups(off_w.shape[0], kh * kw, off_w.shape[1], offset_groups, bias is not None,
                                            fn)
  layer = nnx.eval_shape(lambda: DeformConv(
      off_w.shape[1], cout, (kh, kw), strides, padding=padding, kernel_dilation=kernel_dilation,
      feature_group_count=groups, offset_groups=offset_groups, use_bias=bias is not None, modulated=modulated,
      param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs))
  s.load(_state.conv_entries('', layer))  # `weight`, `bias` under the prefix
  if modulated:
    layer.kernel.set_value(layer.kernel[...] / 2)
  assert layer.offset_conv is not None  # built with its offset predictor
  s.load(_state.conv_entries('conv_offset', layer.offset_conv))
  s.check_all_used(hint='check the prefix')
  _state.check_concrete(layer, fn)
  return layer


def _roi_output_size(s: _state.StateReader, output_size: int | Sequence[int] | None, fn: str) -> tuple[int, int]:
  """`output_size` as a pair; when None, read from `offset_fc.4` (`2*out_h*out_w` rows) as a square."""
  if output_size is not None:
    return _args.positive_pair(output_size, 'output_size', fn)
  bins = s.shape('offset_fc.4.weight')[0] // 2
  side = math.isqrt(bins)
  if side * side != bins:
    raise ValueError(f'{fn}: {s.prefix}offset_fc.4.weight predicts offsets for {bins} bins, not a square: pass '
                     'output_size=(out_h, out_w)')
  return side, side


def _load_roi_heads(layer: DeformRoIPool, s: _state.StateReader, hidden: int, channels: int,
                    size: tuple[int, int]) -> None:
  """The FC heads, with mmcv's (C, out_h, out_w) columns and (dx, dy) offset planes reordered to ours."""
  (oh, ow), flat = size, channels * size[0] * size[1]

  def reads_pooled(module: nnx.Linear, key: str) -> None:
    weight = s.get(f'{key}.weight', (hidden, flat)).reshape(hidden, channels, oh, ow)
    _state.assign(module.kernel, weight.transpose(0, 2, 3, 1).reshape(hidden, flat).T)
    _state.assign(_state.present(module.bias, f'{key}.bias'), s.get(f'{key}.bias', (hidden,)))

  reads_pooled(layer.offset_hidden[0], 'offset_fc.0')
  s.linear(layer.offset_hidden[1], 'offset_fc.2')
  # mmcv's rows (2, out_h, out_w) with channel 0 = dx become (out_h, out_w, 2) with (dy, dx): flip, then move.
  weight = s.get('offset_fc.4.weight', (2 * oh * ow, hidden)).reshape(2, oh, ow, hidden)[::-1]
  _state.assign(layer.offset_out.kernel, weight.transpose(1, 2, 0, 3).reshape(2 * oh * ow, hidden).T)
  bias = s.get('offset_fc.4.bias', (2 * oh * ow,)).reshape(2, oh, ow)[::-1]
  _state.assign(_state.present(layer.offset_out.bias, 'offset_fc.4.bias'),
                bias.transpose(1, 2, 0).reshape(2 * oh * ow))
  if layer.modulated:
    assert layer.mask_hidden is not None  # modulated, with hidden layers
    reads_pooled(layer.mask_hidden, 'mask_fc.0')
    s.linear(layer.mask_out, 'mask_fc.2')  # its rows (out_h, out_w) are already the mask's order


def from_mmcv_deform_roi_pool(state: Mapping[str, np.ndarray], *, output_size: int | Sequence[int] | None = None,
                              spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                              prefix: str = '', param_dtype: DTypeLike = np.float32,
                              **module_kwargs: Any) -> DeformRoIPool:
  """A `DeformRoIPool` reproducing an mmcv `DeformRoIPoolPack` or `ModulatedDeformRoIPoolPack`.

  Which pack it is comes from the keys (`mask_fc.*` present: the modulated one); the channels and the head widths
  are read from the weights. mmcv's boxes are always half-pixel aligned (`aligned=True`) and its mask is
  `sigmoid` (`modulation='sigmoid'`).

  Args:
    state: the module's `state_dict()` as numpy arrays: `offset_fc.0`, `offset_fc.2`, `offset_fc.4` (weight and
      bias each) and, for the modulated pack, `mask_fc.0`, `mask_fc.2`; under `prefix`. Entries outside `prefix`
      are ignored; any other entry under it is refused.
    output_size: the pack's `output_size`, an int or a pair (read from `offset_fc.4` when None, if square).
    spatial_scale: the pack's `spatial_scale`.
    sampling_ratio: the pack's `sampling_ratio`.
    gamma: the pack's `gamma`, the offsets' scale.
    prefix: the module's prefix in `state`, e.g. `'roi_head.bbox_roi_extractor.roi_layers.0.'`.
    param_dtype: the parameters' dtype.
    **module_kwargs: `DeformRoIPool` options a checkpoint does not hold (`dtype`, `precision`,
      `max_sampling_grid`, `chunk_size`, ...).

  Returns:
    A `DeformRoIPool` whose `layer(features, rois)` equals the pack's `forward(features_nchw, rois)` transposed by
    `(0, 2, 3, 1)`, for `features = features_nchw.transpose(0, 2, 3, 1)` and the same `rois [R, 5]`
    (batch_index, x1, y1, x2, y2).

  Raises:
    ValueError: naming a missing (with the `prefix=` to pass), wrongly shaped or unknown entry.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert import from_mmcv_deform_roi_pool
    >>> c, f, rng = 8, 16, np.random.default_rng(0)  # DeformRoIPoolPack(output_size=3, output_channels=8, 16)
    >>> state = {'offset_fc.0.weight': rng.normal(size=(f, c * 9)), 'offset_fc.0.bias': np.zeros(f),
    ...          'offset_fc.2.weight': rng.normal(size=(f, f)), 'offset_fc.2.bias': np.zeros(f),
    ...          'offset_fc.4.weight': np.zeros((18, f)), 'offset_fc.4.bias': np.zeros(18)}
    >>> pool = from_mmcv_deform_roi_pool(state, spatial_scale=0.5)
    >>> pool.modulated, pool(np.ones((1, 12, 12, c), np.float32), np.array([[0, 2.0, 2.0, 20.0, 16.0]])).shape
    (False, (1, 3, 3, 8))
  """
  fn = 'from_mmcv_deform_roi_pool'
  s = _state.StateReader(state, prefix, fn, param_dtype)
  hidden, flat = s.linear_shape('offset_fc.0.weight')
  oh, ow = _roi_output_size(s, output_size, fn)
  if flat % (oh * ow):
    raise ValueError(f'{fn}: {prefix + "offset_fc.0.weight"!r} reads {flat} features, which is not output_size '
                     f'{oh}x{ow} = {oh * ow} bins times a channel count (is output_size the pack\'s?)')
  channels = flat // (oh * ow)
  modulated = any(k.startswith(prefix + 'mask_fc.') for k in s.state)
  layer = nnx.eval_shape(lambda: DeformRoIPool(
      channels, (oh, ow), spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma, aligned=True,
      hidden_features=(hidden, hidden), modulated=modulated, modulation='sigmoid', param_dtype=param_dtype,
      rngs=nnx.Rngs(0), **module_kwargs))
  _load_roi_heads(layer, s, hidden, channels, (oh, ow))
  s.check_all_used(hint='check output_size and the prefix')
  _state.check_concrete(layer, fn)
  return layer


__all__ = ['from_mmcv', 'from_mmcv_deform_roi_pool']
