"""What the ops accept as arrays: anything jnp.asarray accepts, with clear errors otherwise."""

from __future__ import annotations

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
