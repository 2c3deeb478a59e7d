"""What the ops accept as arrays: anything jnp.asarray accepts, with clear errors otherwise."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from deformjax.ops import bilinear_sample, deform_conv2d, deform_roi_pool


def problem(seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=rng.normal(size=(2, 6, 5, 3)), off=rng.uniform(-2, 2, size=(2, 6, 5, 18)),
              w=rng.normal(size=(3, 3, 3, 4)), m=rng.uniform(size=(2, 6, 5, 9)), b=rng.normal(size=4),
              coords=rng.uniform(-1, 6, size=(2, 7, 2)), rois=np.array([[0, 0.5, 1.0, 4.0, 5.0], [1, 1, 0, 3, 5.5]]))


def test_numpy_inputs_work_outside_jit_and_equal_jax_inputs():
  p = problem()
  j = {k: jnp.asarray(v) for k, v in p.items()}
  np.testing.assert_array_equal(np.asarray(deform_conv2d(p['x'], p['off'], p['w'], p['m'], p['b'], padding=1)),
                                np.asarray(deform_conv2d(j['x'], j['off'], j['w'], j['m'], j['b'], padding=1)))
  np.testing.assert_array_equal(np.asarray(bilinear_sample(p['x'], p['coords'])),
                                np.asarray(bilinear_sample(j['x'], j['coords'])))
  np.testing.assert_array_equal(np.asarray(deform_roi_pool(p['x'], p['rois'], output_size=2)),
                                np.asarray(deform_roi_pool(j['x'], j['rois'], output_size=2)))


def test_lists_are_arrays_too():
  p = problem()
  got = bilinear_sample(p['x'].tolist(), p['coords'].tolist())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(bilinear_sample(p['x'], p['coords'])))


@pytest.mark.parametrize('bad', [{'not': 'an array'}, object(), 'text'], ids=['dict', 'object', 'str'])
def test_non_arrays_are_named_in_one_line(bad):
  p = problem()
  with pytest.raises(TypeError, match=r'deform_conv2d: offsets must be an array') as err:
    deform_conv2d(p['x'], bad, p['w'], padding=1)
  assert '\n' not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize('padding', [((1.5, 1), (1, 1)), (('1', 1), (1, 1)), ((1, True), (1, 1)), (1.5, 1),
                                     ('1', '1'), 1.0],
                         ids=['float-pair', 'str-pair', 'bool', 'float', 'str', 'float-scalar'])
def test_padding_that_is_not_ints_is_refused_not_truncated(padding):
  p = problem()
  with pytest.raises(ValueError, match=r"deform_conv2d: padding must be .* of ints, got"):
    deform_conv2d(p['x'], p['off'], p['w'], padding=padding)


@pytest.mark.parametrize('dtype', [jnp.int8, jnp.int32, jnp.bool_])
def test_preferred_element_type_must_be_floating(dtype):
  p = problem()
  with pytest.raises(ValueError, match=r'deform_conv2d: preferred_element_type must be a floating dtype'):
    deform_conv2d(p['x'], p['off'], p['w'], padding=1, preferred_element_type=dtype)


@pytest.mark.parametrize('kwargs, message', [
    (dict(sampling_ratio=True), r'sampling_ratio must be a non-negative int \(0 = adaptive\), got True'),
    (dict(sampling_ratio=1.5), r'sampling_ratio must be a non-negative int \(0 = adaptive\), got 1.5'),
    (dict(spatial_scale=-1), r'spatial_scale must be a finite number > 0 .*got -1'),
    (dict(spatial_scale=0.0), r'spatial_scale must be a finite number > 0 .*got 0.0'),
    (dict(spatial_scale=float('inf')), r'spatial_scale must be a finite number > 0 .*got inf'),
    (dict(spatial_scale=True), r'spatial_scale must be a finite number > 0 .*got True'),
])
def test_roi_pool_arguments_are_named(kwargs, message):
  p = problem()
  with pytest.raises(ValueError, match='deform_roi_pool: ' + message):
    deform_roi_pool(p['x'], p['rois'], output_size=2, **kwargs)



def test_a_non_bool_roi_pool_flag_is_a_type_error():
  p = problem()
  with pytest.raises(TypeError, match='deform_roi_pool: aligned must be a bool, got 2'):
    deform_roi_pool(p['x'], p['rois'], output_size=2, aligned=2)


@pytest.mark.parametrize('size', [1e4, 3e4, 1e9, float('inf')])
def test_huge_boxes_outside_jit_pool_like_jit_within_the_memory_budget(size):
  import jax

  from deformjax.ops import roi_align

  feats = np.random.default_rng(0).normal(size=(1, 16, 16, 8)).astype(np.float32)
  rois = np.array([[0, 0, 0, size, size], [0, 1, 2, 9, 12]], np.float32)
  eager = roi_align(feats, rois, output_size=7)  # the exact grid would need up to ~1e18 samples
  jitted = jax.jit(lambda r: roi_align(feats, r, output_size=7))(rois)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-6, atol=1e-6)
  assert np.isfinite(np.asarray(eager)).all()
  # The ordinary box keeps torchvision's exact grid, as if pooled alone.
  np.testing.assert_allclose(np.asarray(eager[1]), np.asarray(roi_align(feats, rois[1:], output_size=7)[0]),
                             rtol=1e-6, atol=1e-6)


def test_static_shape_is_a_tuple_under_any_trace():
  import jax

  from deformjax.ops import _args

  seen = []
  jax.make_jaxpr(lambda a: seen.append(_args.static_shape(a)) or a)(jnp.zeros((2, 3), jnp.float32))
  b, = jax.export.symbolic_shape('b')
  jax.make_jaxpr(lambda a: seen.append(_args.static_shape(a)) or a)(jax.ShapeDtypeStruct((b, 3), jnp.float32))
  assert seen[0] == (2, 3) and isinstance(seen[0], tuple)
  assert seen[1][1] == 3 and jax.export.is_symbolic_dim(seen[1][0])


@pytest.fixture
def traced_shape_functions(patch_traced):
  """`jnp.shape` / `jnp.size` replaced by functions returning traced arrays, as jax2onnx does while it converts.

  A check that decides a Python `if` on them raises TracerBoolConversionError.
  """
  import jax

  original_shape, original_size = jnp.shape, jnp.size
  patch_traced(jnp, 'shape', lambda a: jax.lax.stop_gradient(jnp.asarray(original_shape(a), jnp.int32)))
  patch_traced(jnp, 'size', lambda a, axis=None: jax.lax.stop_gradient(jnp.asarray(original_size(a, axis))))


def test_ops_trace_when_jnp_shape_is_traced(traced_shape_functions):
  import jax

  p = {k: jnp.asarray(v, jnp.float32) for k, v in problem().items()}
  want_conv = deform_conv2d(p['x'], p['off'], p['w'], p['m'], p['b'], padding=1)
  jax.make_jaxpr(lambda x, off: deform_conv2d(x, off, p['w'], p['m'], p['b'], padding=1))(p['x'], p['off'])
  jax.make_jaxpr(bilinear_sample)(p['x'], p['coords'])
  jax.make_jaxpr(lambda x, r: deform_roi_pool(x, r, output_size=2))(p['x'], p['rois'])
  got = jax.jit(lambda x, off: deform_conv2d(x, off, p['w'], p['m'], p['b'], padding=1))(p['x'], p['off'])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want_conv), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('call, message', [
    (lambda p: deform_conv2d(p['x'], p['off'][..., :17], p['w'], padding=1),
     r'^deform_conv2d: offsets must have shape \[N, Ho, Wo, offset_groups\*kh\*kw\*2\]; their 17 channels are not '
     r'a positive multiple of 2\*kh\*kw = 18'),
    (lambda p: deform_conv2d(p['x'], p['off'][:, :5], p['w'], padding=1),
     r'^deform_conv2d: offsets must have shape \[N, Ho, Wo, offset_groups\*kh\*kw\*2\] = \(2, 6, 5, 18\), '
     r'got \(2, 5, 5, 18\)$'),
    (lambda p: deform_conv2d(p['x'], p['off'], p['w'], p['m'][..., :8], padding=1),
     r'^deform_conv2d: mask must have shape \[N, Ho, Wo, offset_groups\*kh\*kw\] = \(2, 6, 5, 9\), got \(2, 6, 5, 8\)$'),
    (lambda p: deform_conv2d(p['x'][0], p['off'], p['w'], padding=1),
     r'^deform_conv2d: inputs must have rank 4 \(\[N, H, W, C\]\), got shape \(6, 5, 3\)$'),
    (lambda p: bilinear_sample(p['x'], p['coords'][..., :1]),
     r'^bilinear_sample: coords must have shape \[\.\.\., P, 2\], got \(2, 7, 1\)$'),
    (lambda p: deform_roi_pool(p['x'], p['rois'][:, :4], output_size=2), r'^deform_roi_pool: rois must'),
], ids=['offset-channels', 'offsets', 'mask', 'rank', 'coords', 'rois'])
def test_errors_are_the_same_one_line_when_jnp_shape_is_traced(call, message, traced_shape_functions):
  """Bad input fails as it does without the substitution: one line naming the argument and the shape it needs."""
  import jax

  p = {k: jnp.asarray(v, jnp.float32) for k, v in problem().items()}
  with pytest.raises(ValueError) as err:
    jax.make_jaxpr(lambda: call(p))()
  # Raised inside a trace, JAX appends a note on its filtered traceback after a '-----' line.
  own = str(err.value).split('\n--------------------')[0]
  assert re.search(message, own) and '\n' not in own, own
