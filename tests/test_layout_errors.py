"""PyTorch's layouts passed where deformjax expects its own: every op and module names the array, the layout it
looks like, the layout it needs and the transpose that gives it. Error paths only: nothing here compiles a pass."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax import nn as djnn
from deformjax.ops import dcnv3, dcnv4, deform_conv2d, deform_roi_pool, ms_deform_attn, roi_align

NCHW = 'looks NCHW (PyTorch): deformjax is NHWC: pass {name}.transpose(0, 2, 3, 1)'
OIHW = 'looks OIHW (PyTorch): deformjax is HWIO: pass kernel.transpose(2, 3, 1, 0)'

X = np.ones((2, 8, 8, 16), np.float32)  # NHWC
W = np.ones((3, 3, 16, 32), np.float32)  # HWIO
OFF = np.zeros((2, 8, 8, 18), np.float32)
MASK = np.ones((2, 8, 8, 9), np.float32)
T = (0, 3, 1, 2)  # NHWC -> NCHW


def raises(fragments, fn, *args, **kwargs):
  with pytest.raises(ValueError) as err:
    fn(*args, **kwargs)
  for fragment in fragments:
    assert fragment in str(err.value), (fragment, str(err.value))
  return str(err.value)


@pytest.mark.parametrize('case', ['inputs', 'kernel', 'offsets', 'mask'])
def test_deform_conv2d_names_each_pytorch_array(case):
  arrays = dict(inputs=X, offsets=OFF, kernel=W, mask=MASK)
  arrays[case] = W.transpose(3, 2, 0, 1) if case == 'kernel' else arrays[case].transpose(T)
  fragment = OIHW if case == 'kernel' else NCHW.format(name=case)
  msg = raises([f'deform_conv2d: {case} (shape {arrays[case].shape})', fragment], deform_conv2d, arrays['inputs'],
               arrays['offsets'], arrays['kernel'], arrays['mask'], padding=1)
  assert msg.count('looks') == 1  # only the array at fault


def test_deform_conv2d_names_every_pytorch_array_at_once():
  msg = raises([NCHW.format(name='inputs'), OIHW, NCHW.format(name='offsets'), NCHW.format(name='mask')],
               deform_conv2d, X.transpose(T), OFF.transpose(T), W.transpose(3, 2, 0, 1), MASK.transpose(T), padding=1)
  assert msg.startswith('deform_conv2d: ')


def test_deform_conv2d_keeps_its_own_message_when_no_layout_explains_the_shapes():
  raises(['offsets must have shape [N, Ho, Wo, offset_groups*kh*kw*2]'], deform_conv2d, X, OFF[..., :16], W,
         padding=1, offset_groups=1)


@pytest.mark.parametrize('case', ['inputs', 'offsets', 'mask'])
def test_dcnv3_names_channels_first_arrays(case):
  arrays = dict(inputs=X, offsets=np.zeros((2, 8, 8, 72), np.float32), mask=np.ones((2, 8, 8, 36), np.float32))
  arrays[case] = arrays[case].transpose(T)
  raises([f'dcnv3: {case}', NCHW.format(name=case)], dcnv3, *arrays.values(), kernel_size=3, padding=1, groups=4)


def test_dcnv4_names_channels_first_arrays():
  raises(['dcnv4: inputs', NCHW.format(name='inputs')], dcnv4, X.transpose(T), np.zeros((2, 8, 8, 112), np.float32),
         kernel_size=3, padding=1, groups=4)
  raises(['dcnv4: offset_mask', NCHW.format(name='offset_mask')], dcnv4, X,
         np.zeros((2, 112, 8, 8), np.float32), kernel_size=3, padding=1, groups=4)


def test_ms_deform_attn_names_a_value_with_its_heads_unsplit():
  value = np.ones((1, 20, 16), np.float32)  # transformers' value_proj output, [N, S, M*D]
  raises(['ms_deform_attn: value must have shape [N, sum(H_l*W_l), M, D]', 'value.reshape(N, S, 2, -1)'],
         ms_deform_attn, value, [(4, 4), (2, 2)], np.zeros((1, 5, 2, 2, 3, 2), np.float32),
         np.ones((1, 5, 2, 2, 3), np.float32))


def test_roi_pools_name_themselves_and_mmcv_offsets():
  feats, rois = np.ones((1, 8, 8, 3), np.float32), np.array([[0, 0, 0, 4, 4.0]], np.float32)
  raises(['roi_align: sampling_ratio'], roi_align, feats, rois, output_size=2, sampling_ratio=-1)
  raises(['roi_align: rois must have shape [R, 5]'], roi_align, feats, rois[:, :4], output_size=2)
  raises(["deform_roi_pool: offsets (shape (1, 2, 3, 4)) look like mmcv's [R, 2, out_h, out_w]",
          'offsets.transpose(0, 2, 3, 1)[..., ::-1]'], deform_roi_pool, feats, rois, np.zeros((1, 2, 3, 4), np.float32),
         output_size=(3, 4))


def test_modules_name_channels_first_inputs():
  rngs = nnx.Rngs(0)
  raises(['DeformConv: inputs', NCHW.format(name='inputs')], djnn.DeformConv(16, 8, 3, rngs=rngs), X.transpose(T))
  raises(['DeformConv.__call__: mask', NCHW.format(name='mask')], djnn.DeformConv(16, 8, 3, rngs=rngs), X,
         mask=MASK.transpose(T))
  raises(['DCNv3: inputs', NCHW.format(name='inputs')], djnn.DCNv3(16, rngs=rngs), X.transpose(T))
  raises(['DCNv4: inputs', NCHW.format(name='inputs')], djnn.DCNv4(16, rngs=rngs), X.transpose(T))
  msg = raises(['DeformRoIPool: inputs', 'pass inputs.transpose(1, 2, 0)'],
               djnn.DeformRoIPool(16, 2, hidden_features=(), rngs=rngs), X[0].transpose(2, 0, 1),
               np.zeros((1, 5), np.float32))
  assert re.search(r'got \(16, 8, 8\)', msg)


def test_msdeformattn_names_sequence_first_inputs_and_takes_an_array_of_shapes():
  layer = djnn.MSDeformAttn(32, 4, 2, 3, rngs=nnx.Rngs(0))
  f32 = jnp.float32
  query, ref, inputs = jnp.ones((2, 5, 32), f32), jnp.full((2, 5, 2, 2), 0.5, f32), jnp.ones((2, 80, 32), f32)
  raises(['MSDeformAttn: query (5, 2, 32) and inputs (80, 2, 32) look sequence-first', 'query.transpose(1, 0, 2)'],
         layer, query.transpose(1, 0, 2), ref, inputs.transpose(1, 0, 2), [(8, 8), (4, 4)])
  expected = layer(query, ref, inputs, [(8, 8), (4, 4)])
  for shapes in (np.array([[8, 8], [4, 4]]), jnp.array([[8, 8], [4, 4]])):
    np.testing.assert_array_equal(np.asarray(layer(query, ref, inputs, shapes)), np.asarray(expected))
