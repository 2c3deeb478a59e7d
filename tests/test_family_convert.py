"""Converters of the deformable family against the PyTorch modules they port.

transformers' `DeformableDetrMultiscaleDeformableAttention` is the real module
(its pure-PyTorch path runs on CPU). InternImage's DCNv3 and OpenGVLab's DCNv4
are not pip-installable, so `TorchDCNv3` / `TorchDCNv4` below re-implement them
from the references (`ops_dcnv3/modules/dcnv3.py::DCNv3_pytorch` over
`dcnv3_core_pytorch`'s grid_sample formulation; `DCNv4_op/DCNv4/modules/dcnv4.py`
with its kernel's packed offset_mask), with the references' parameter names, so
their `state_dict()` is what a checkpoint holds; those tests skip where torch is absent.

mmcv is not installable here: its `MultiScaleDeformableAttention` is written out
from `mmcv/ops/multi_scale_deform_attn.py` in float64 numpy (over the repository's
attention reference), with mmcv's parameter names and shapes, and runs everywhere.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax import convert
from tests.reference import ms_deform_attn_ref

try:
  import torch
except ImportError:  # the PyTorch references below need it; the mmcv test's numpy reference does not
  torch = None
requires_torch = pytest.mark.skipif(torch is None, reason='needs torch, not installed here')
F = None if torch is None else torch.nn.functional
# The reference modules' base: defining them must not need torch, so that this file imports without it.
_TorchModule = object if torch is None else torch.nn.Module


def dcnv3_core_torch(x, offset, mask, k, stride, pad, dilation, group, offset_scale, remove_center):
  """InternImage's `dcnv3_core_pytorch` (square kernel): normalised grid_sample locations on the padded input."""
  x = F.pad(x, [0, 0, pad, pad, pad, pad])
  n, h_in, w_in, c = x.shape
  _, h_out, w_out, _ = offset.shape
  c0 = (dilation * (k - 1)) // 2
  ref_y, ref_x = torch.meshgrid(
      torch.linspace(c0 + 0.5, c0 + 0.5 + (h_out - 1) * stride, h_out, dtype=x.dtype),
      torch.linspace(c0 + 0.5, c0 + 0.5 + (w_out - 1) * stride, w_out, dtype=x.dtype), indexing='ij')
  ref = torch.stack((ref_x.reshape(-1) / w_in, ref_y.reshape(-1) / h_in), -1).reshape(1, h_out, w_out, 1, 2)
  gx, gy = torch.meshgrid(torch.linspace(-c0, -c0 + (k - 1) * dilation, k, dtype=x.dtype),
                          torch.linspace(-c0, -c0 + (k - 1) * dilation, k, dtype=x.dtype), indexing='ij')
  grid = torch.stack([gx / w_in, gy / h_in], -1).reshape(-1, 1, 2).repeat(1, group, 1).permute(1, 0, 2)
  taps = k * k
  if remove_center:
    keep = [t for t in range(taps) if t != taps // 2]
    grid, taps = grid[:, keep], taps - 1
  grid = grid.reshape(1, 1, 1, group * taps, 2)
  norm = torch.tensor([w_in, h_in], dtype=x.dtype).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * taps)
  loc = (ref + grid * offset_scale).repeat(n, 1, 1, 1, 1).flatten(3, 4) + offset * offset_scale / norm
  grids = (2 * loc - 1).view(n, h_out * w_out, group, taps, 2).transpose(1, 2).flatten(0, 1)
  gc = c // group
  value = x.view(n, h_in * w_in, c).transpose(1, 2).reshape(n * group, gc, h_in, w_in)
  sampled = F.grid_sample(value, grids, mode='bilinear', padding_mode='zeros', align_corners=False)
  mask = mask.view(n, h_out * w_out, group, taps).transpose(1, 2).reshape(n * group, 1, h_out * w_out, taps)
  out = (sampled * mask).sum(-1).view(n, c, h_out * w_out)
  return out.transpose(1, 2).reshape(n, h_out, w_out, -1)


class TorchDCNv3(_TorchModule):
  """InternImage's `DCNv3_pytorch` (LayerNorm + GELU offset branch), parameter names included."""

  def __init__(self, channels, kernel_size=3, dw_kernel_size=None, pad=1, dilation=1, group=4, offset_scale=1.0,
               center_feature_scale=False, remove_center=False):
    super().__init__()
    dw = dw_kernel_size or kernel_size
    self.k, self.pad, self.dilation, self.group, self.offset_scale = kernel_size, pad, dilation, group, offset_scale
    self.remove_center, self.cfs, self.channels = int(remove_center), center_feature_scale, channels
    taps = kernel_size * kernel_size - self.remove_center
    self.dw_conv = torch.nn.Sequential(
        torch.nn.Conv2d(channels, channels, dw, padding=(dw - 1) // 2, groups=channels),
        torch.nn.Sequential(Permute(0, 2, 3, 1), torch.nn.LayerNorm(channels, eps=1e-6)), torch.nn.GELU())
    self.offset = torch.nn.Linear(channels, group * taps * 2)
    self.mask = torch.nn.Linear(channels, group * taps)
    self.input_proj = torch.nn.Linear(channels, channels)
    self.output_proj = torch.nn.Linear(channels, channels)
    if center_feature_scale:
      self.center_feature_scale_proj_weight = torch.nn.Parameter(torch.zeros((group, channels)))
      self.center_feature_scale_proj_bias = torch.nn.Parameter(torch.zeros(group))

  def forward(self, inputs):
    n, h, w, _ = inputs.shape
    x = self.input_proj(inputs)
    x_proj = x
    x1 = self.dw_conv(inputs.permute(0, 3, 1, 2))
    offset = self.offset(x1)
    mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
    x = dcnv3_core_torch(x, offset, mask, self.k, 1, self.pad, self.dilation, self.group, self.offset_scale,
                         self.remove_center)
    if self.cfs:
      s = F.linear(x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias).sigmoid()
      s = s[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
      x = x * (1 - s) + x_proj * s
    return self.output_proj(x)


class Permute(_TorchModule):
  def __init__(self, *dims):
    super().__init__()
    self.dims = dims

  def forward(self, x):
    return x.permute(*self.dims)


class TorchDCNv4(_TorchModule):
  """OpenGVLab's `DCNv4` module; its CUDA op is DCNv3's aggregation on the packed offset_mask (per group K*2
  offsets then K mask values, no softmax), written here through `dcnv3_core_torch`."""

  def __init__(self, channels, kernel_size=3, pad=1, dilation=1, group=4, offset_scale=1.0, dw_kernel_size=None,
               center_feature_scale=False, remove_center=False, output_bias=True, without_pointwise=False):
    super().__init__()
    self.k, self.pad, self.dilation, self.group, self.offset_scale = kernel_size, pad, dilation, group, offset_scale
    self.remove_center, self.cfs, self.channels = int(remove_center), center_feature_scale, channels
    self.without_pointwise, self.dw = without_pointwise, dw_kernel_size
    self.taps = kernel_size * kernel_size - self.remove_center
    if dw_kernel_size is not None:
      self.offset_mask_dw = torch.nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
                                            groups=channels)
    self.offset_mask = torch.nn.Linear(channels, int(math.ceil(group * self.taps * 3 / 8) * 8))
    if not without_pointwise:
      self.value_proj = torch.nn.Linear(channels, channels)
      self.output_proj = torch.nn.Linear(channels, channels, bias=output_bias)
    if center_feature_scale:
      self.center_feature_scale_proj_weight = torch.nn.Parameter(torch.zeros((group, channels)))
      self.center_feature_scale_proj_bias = torch.nn.Parameter(torch.zeros(group))

  def forward(self, inputs, shape):
    n, length, c = inputs.shape
    h, w = shape
    x = inputs if self.without_pointwise else self.value_proj(inputs)
    x = x.reshape(n, h, w, -1)
    om_in = inputs
    if self.dw is not None:
      om_in = self.offset_mask_dw(inputs.view(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, length, c)
    om = self.offset_mask(om_in).reshape(n, h, w, -1)
    packed = om[..., :self.group * self.taps * 3].reshape(n, h, w, self.group, self.taps * 3)
    offset = packed[..., :self.taps * 2].reshape(n, h, w, -1)
    mask = packed[..., self.taps * 2:].reshape(n, h, w, -1)
    x_proj = x
    x = dcnv3_core_torch(x, offset, mask, self.k, 1, self.pad, self.dilation, self.group, self.offset_scale,
                         self.remove_center)
    if self.cfs:
      s = F.linear(x, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias).sigmoid()
      s = s[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
      x = x * (1 - s) + x_proj * s
    x = x.reshape(n, length, -1)
    return x if self.without_pointwise else self.output_proj(x)


def randomise(module, seed=0, scale=0.5):
  """Every parameter random (the references zero the offset heads; zero heads would test nothing)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
  return module


def numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def assert_close(ours, theirs, rtol=1e-5):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * np.abs(theirs).max())


@requires_torch
@pytest.mark.parametrize('kw', [
    dict(),
    dict(center_feature_scale=True, offset_scale=0.5),
    dict(remove_center=True, dw_kernel_size=5),
    dict(kernel_size=5, pad=4, dilation=2, group=2),
])
def test_from_dcnv3_reproduces_the_module(kw):
  group, k = kw.get('group', 4), kw.get('kernel_size', 3)
  ref = randomise(TorchDCNv3(16, **kw), seed=1)
  x = np.random.default_rng(0).normal(size=(2, 7, 9, 16)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  layer = convert.from_dcnv3(numpy_state(ref), groups=group, kernel_size=k, padding=kw.get('pad'),
                                         dilation=kw.get('dilation', 1), offset_scale=kw.get('offset_scale', 1.0),
                                         remove_center=kw.get('remove_center', False))
  assert_close(nnx.jit(lambda m, v: m(v))(layer, jnp.asarray(x)), expected)


@requires_torch
@pytest.mark.parametrize('kw', [
    dict(),
    dict(dw_kernel_size=3, center_feature_scale=True),
    dict(remove_center=True, output_bias=False, offset_scale=2.0),
    dict(without_pointwise=True, group=2),
])
def test_from_dcnv4_reproduces_the_module(kw):
  ref = randomise(TorchDCNv4(32, **kw), seed=2, scale=0.3)
  n, h, w = 2, 6, 5
  x = np.random.default_rng(1).normal(size=(n, h, w, 32)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x).reshape(n, h * w, 32), (h, w)).numpy().reshape(n, h, w, 32)
  layer = convert.from_dcnv4(numpy_state(ref), groups=kw.get('group', 4), offset_scale=kw.get('offset_scale', 1.0),
                             remove_center=kw.get('remove_center', False))
  assert layer.without_pointwise == kw.get('without_pointwise', False)
  assert_close(nnx.jit(lambda m, v: m(v))(layer, jnp.asarray(x)), expected)


@requires_torch
def test_from_dcnv4_ignores_the_padding_channels():
  """ceil8(4*9*3) = 112 outputs carry 108 used channels: weights in the last 4 change nothing."""
  ref = randomise(TorchDCNv4(32), seed=3, scale=0.3)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 5, 32)).astype(np.float32))
  state = numpy_state(ref)
  base = convert.from_dcnv4(state, groups=4)(x)
  state['offset_mask.weight'][108:] = 100.0
  assert_close(convert.from_dcnv4(state, groups=4)(x), base, rtol=1e-6)


def detr_attention(d_model=32, heads=4, levels=2, points=3):
  pytest.importorskip('transformers', exc_type=ImportError)
  from transformers.models.deformable_detr.modeling_deformable_detr import (
      DeformableDetrConfig,
      DeformableDetrMultiscaleDeformableAttention,
  )

  config = DeformableDetrConfig(d_model=d_model, encoder_attention_heads=heads, num_feature_levels=levels,
                                encoder_n_points=points, disable_custom_kernels=True)
  return randomise(DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads, n_points=points), seed=4,
                   scale=0.3).eval()


@requires_torch
@pytest.mark.parametrize('coords', [2, 4])
@pytest.mark.parametrize('masked', [False, True])
def test_from_deformable_detr_attention_reproduces_transformers(coords, masked):
  shapes = [(6, 5), (3, 3)]
  total = sum(h * w for h, w in shapes)
  module = detr_attention()
  rng = np.random.default_rng(5)
  n, lq = 2, 7
  query = rng.normal(size=(n, lq, 32)).astype(np.float32)
  pos = rng.normal(size=(n, lq, 32)).astype(np.float32)
  inputs = rng.normal(size=(n, total, 32)).astype(np.float32)
  ref = rng.uniform(0.1, 0.9, size=(n, lq, 2, coords)).astype(np.float32)
  if coords == 4:
    ref[..., 2:] = rng.uniform(0.1, 0.5, size=(n, lq, 2, 2))
  padding = np.zeros((n, total), bool)
  if masked:
    padding[1, ::3] = True
  t = torch.from_numpy
  spatial = torch.tensor(shapes, dtype=torch.long)
  with torch.no_grad():
    expected, _ = module(t(query), attention_mask=t(~padding) if masked else None, encoder_hidden_states=t(inputs),
                         position_embeddings=t(pos), reference_points=t(ref), spatial_shapes=spatial,
                         spatial_shapes_list=shapes,
                         level_start_index=torch.tensor([0, shapes[0][0] * shapes[0][1]]))
  layer = convert.from_deformable_detr_attention(numpy_state(module), num_heads=4, num_levels=2, num_points=3)
  mask = jnp.asarray(padding) if masked else None
  ours = nnx.jit(lambda m, *xs: m(*xs, shapes, mask))(layer, jnp.asarray(query + pos), jnp.asarray(ref),
                                                      jnp.asarray(inputs))
  assert_close(ours, expected.numpy())


@requires_torch
def test_deformable_detr_initialisation_matches_transformers():
  """The directional bias and the zero / Xavier choices of transformers' `_init_weights`."""
  pytest.importorskip('transformers', exc_type=ImportError)
  from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrConfig, DeformableDetrEncoder

  from deformjax.nn import MSDeformAttn

  config = DeformableDetrConfig(d_model=32, encoder_layers=1, encoder_attention_heads=8, num_feature_levels=3,
                                encoder_n_points=4, encoder_ffn_dim=16, disable_custom_kernels=True)
  module = DeformableDetrEncoder(config).layers[0].self_attn  # a PreTrainedModel: built with _init_weights

  layer = MSDeformAttn(32, 8, 3, 4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer.sampling_offsets.bias[...], module.sampling_offsets.bias.detach().numpy(), rtol=1e-5,
                             atol=1e-6)
  for name in ('sampling_offsets', 'attention_weights'):
    assert not np.any(np.asarray(getattr(layer, name).kernel[...]))
  assert not np.any(np.asarray(layer.attention_weights.bias[...]))


@requires_torch
def test_converters_name_missing_and_misshapen_entries():
  ref = TorchDCNv3(16)
  state = numpy_state(ref)
  with pytest.raises(ValueError, match=r"from_dcnv3: 'offset.weight' must have shape \(64, 16\), got \(72, 16\)"):
    convert.from_dcnv3(state, groups=4, kernel_size=3, remove_center=True)
  del state['mask.bias']
  with pytest.raises(ValueError, match="state has no 'mask.bias'"):
    convert.from_dcnv3(state, groups=4)
  state = numpy_state(TorchDCNv4(32))
  with pytest.raises(ValueError, match='from_dcnv4: .*offset_mask.weight'):
    convert.from_dcnv4(state, groups=2)
  with pytest.raises(ValueError, match="from_deformable_detr_attention: .*'x.value_proj.weight'"):
    convert.from_deformable_detr_attention({}, num_heads=4, num_levels=2, num_points=3, prefix='x.')


def mmcv_multi_scale_deformable_attention(state, query, value, identity, query_pos, key_padding_mask,
                                          reference_points, spatial_shapes, *, num_heads, num_levels, num_points):
  """mmcv's `MultiScaleDeformableAttention.forward` (batch_first=False, eval mode: dropout is the identity) in float64.

  `query [Lq, N, C]`, `value [S, N, C]` or None (then the query, before `query_pos`), `identity` or None (then the
  query, before `query_pos`), `reference_points [N, Lq, L, 2 or 4]`. Returns `[Lq, N, C]`.
  """
  linear = lambda x, key: x @ state[f'{key}.weight'].T + state[f'{key}.bias']
  value = query if value is None else value
  identity = query if identity is None else identity
  query = query if query_pos is None else query + query_pos
  query, value = query.transpose(1, 0, 2), value.transpose(1, 0, 2)
  n, lq, _ = query.shape
  value = linear(value, 'value_proj')
  if key_padding_mask is not None:
    value = np.where(key_padding_mask[..., None], 0.0, value)
  value = value.reshape(n, value.shape[1], num_heads, -1)
  offsets = linear(query, 'sampling_offsets').reshape(n, lq, num_heads, num_levels, num_points, 2)
  logits = linear(query, 'attention_weights').reshape(n, lq, num_heads, num_levels * num_points)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).reshape(n, lq, num_heads, num_levels, num_points)
  if reference_points.shape[-1] == 2:
    normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float64)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
  else:
    locations = (reference_points[:, :, None, :, None, :2]
                 + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
  out = linear(ms_deform_attn_ref(value, spatial_shapes, locations, weights), 'output_proj')
  return out.transpose(1, 0, 2) + identity


@pytest.mark.parametrize('coords', [2, 4], ids=['points', 'boxes'])
def test_from_deformable_detr_attention_reproduces_mmcv_with_value_proj_ratio(coords):
  """mmcv's `MultiScaleDeformableAttention(embed_dims=8, num_heads=2, num_levels=2, num_points=2,
  value_proj_ratio=0.5)`: `value_proj [4, 8]`, `output_proj [8, 4]`. The converted layer, with the sequence-first
  transposes and the residual its docstring names, equals mmcv's forward."""
  d, m, lv, p, vd = 8, 2, 2, 2, 4  # vd = int(embed_dims * value_proj_ratio)
  rng = np.random.default_rng(7)
  shapes = {'sampling_offsets': (m * lv * p * 2, d), 'attention_weights': (m * lv * p, d), 'value_proj': (vd, d),
            'output_proj': (d, vd)}
  state = {}
  for key, shape in shapes.items():
    state[f'{key}.weight'] = rng.normal(size=shape) * 0.5
    state[f'{key}.bias'] = rng.normal(size=shape[0]) * 0.5
  layer = convert.from_deformable_detr_attention(state, num_heads=m, num_levels=lv, num_points=p, param_dtype=np.float64)
  assert layer.value_features == vd
  spatial_shapes = [(3, 4), (2, 2)]
  n, lq, total = 2, 5, 16
  query, query_pos = rng.normal(size=(lq, n, d)), rng.normal(size=(lq, n, d))
  value = rng.normal(size=(total, n, d))
  ref = rng.uniform(0.1, 0.9, size=(n, lq, lv, coords))
  padding = np.zeros((n, total), bool)
  padding[1, ::3] = True
  want = mmcv_multi_scale_deformable_attention(state, query, value, None, query_pos, padding, ref, spatial_shapes,
                                               num_heads=m, num_levels=lv, num_points=p)
  t = lambda a: jnp.asarray(a).transpose(1, 0, 2)  # mmcv's batch_first=False layout <-> MSDeformAttn's
  attend = nnx.jit(lambda layer, q, r, v, mask: layer(q, r, v, spatial_shapes, padding_mask=mask))
  got = query + t(attend(layer, t(query + query_pos), jnp.asarray(ref), t(value), jnp.asarray(padding)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def test_from_mmcv_takes_deform_conv_s_strides_and_mmcv_s_stride():
  """`strides` is DeformConv's name; `stride`, mmcv's, is the same argument (mmcv constructor kwargs carry over)."""
  rng = np.random.default_rng(0)
  state = {'weight': rng.normal(size=(4, 2, 3, 3)), 'conv_offset.weight': np.zeros((27, 2, 3, 3)),
           'conv_offset.bias': np.zeros(27)}
  assert convert.from_mmcv(state, padding=1).strides == (1, 1)
  assert convert.from_mmcv(state, strides=2, padding=1).strides == (2, 2)
  assert convert.from_mmcv(state, stride=(2, 1), padding=1).strides == (2, 1)
  with pytest.raises(TypeError, match='from_mmcv: pass strides .* or stride .*, not both'):
    convert.from_mmcv(state, strides=2, stride=2)
