"""The studies' classifiers and their regular / deformable switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.models import CifarNet, ConvClassifier, build_model, resolve_deformable
from deformjax.nn import DeformConv


@pytest.mark.parametrize('deformable,expected', [('none', 0), (0, 0), (2, 2), ('2', 2), ('all', 5)])
def test_conv5_switch_picks_the_last_convs(deformable, expected):
  model = ConvClassifier(1, 10, deformable=deformable, rngs=nnx.Rngs(0))
  kinds = [isinstance(c, DeformConv) for c in model.convs]
  assert kinds == [False] * (5 - expected) + [True] * expected


def test_bad_switch_value():
  with pytest.raises(ValueError, match="deformable must be 'none', 'all' or an int in \\[0, 5\\]"):
    resolve_deformable(6, 5)


@pytest.mark.parametrize('model_cls,kw,shape', [
    (ConvClassifier, dict(in_features=1, num_classes=10), (3, 28, 28, 1)),
    (ConvClassifier, dict(in_features=3, num_classes=9, dropout=0.2), (2, 64, 64, 3)),
    (CifarNet, dict(), (2, 32, 32, 3)),
])
def test_fresh_deformable_model_equals_regular_model_with_the_same_weights(model_cls, kw, shape):
  """Zero-initialised offset predictors: swapping convs for DeformConvs changes nothing at step 0."""
  regular = model_cls(deformable='none', rngs=nnx.Rngs(0), **kw)
  deform = model_cls(deformable='all', modulated=True, rngs=nnx.Rngs(1), **kw)
  # Every regular parameter has the same path in the deformable model; the offset predictors stay zero.
  nnx.update(deform, nnx.state(regular, nnx.Param))
  assert float(jnp.abs(deform.convs[0].kernel[...] if hasattr(deform, 'convs') else deform.conv1.kernel[...]).max()) > 0
  x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
  np.testing.assert_allclose(np.asarray(deform(x)), np.asarray(regular(x)), rtol=2e-5, atol=2e-5)


def test_dropout_needs_a_key_only_in_training():
  model = ConvClassifier(3, 9, dropout=0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 32, 32, 3), jnp.float32)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
  a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
  assert float(jnp.abs(a - b).max()) > 0
  assert nnx.state(model, nnx.RngState) == nnx.State({})  # no RNG in the checkpointed state


def test_build_model_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    build_model('resnet', in_features=1, num_classes=10, image_size=28, deformable=0, modulated=False,
                rngs=nnx.Rngs(0))


@pytest.mark.parametrize('shape', [(2, 28, 28, 3), (2, 15, 15, 4), (1, 7, 5, 2)])
def test_max_pool_equals_flax_max_pool_values_and_gradients(shape):
  from deformjax.models.classifiers import _max_pool as max_pool

  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)  # no ties, so one gradient is right
  flax_pool = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool(x), flax_pool(x))
  loss = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)
  np.testing.assert_array_equal(loss(max_pool), loss(flax_pool))
