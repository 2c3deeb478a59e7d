"""The ops' execution-policy keywords on every sampling module, NNX and Linen.

`chunk_size`, `memory_budget` and `deterministic_gradients` reach the op and change how it
runs, never what it computes: at a tiny shape, forced chunks give the default
output, `deterministic_gradients=True` gives the default forward and the same gradients
bit for bit on every call, and bad values are refused by name. One compiled
function per module computes every setting at once (the fast tier's budget).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.nn import DCNv3, DCNv4, DeformConv, DeformRoIPool, MSDeformAttn, _common, linen
from deformjax.ops import deform_roi_pool

ROIS = np.array([[0, 0.5, 1.0, 4.5, 5.0], [1, 1.0, 0.0, 5.5, 3.5]], np.float32)
SHAPES = [(3, 4), (2, 2)]  # MSDeformAttn's two levels: 16 pixels


# Random numbers from numpy: eager jax.random calls would compile once per shape.
def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_like(tree: Any, seed: int) -> Any:
  """Every leaf random (leaves may be abstract): zero-initialised offset heads would leave the sampler on the grid."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [normal(seed + i, leaf.shape, 0.3) for i, leaf in enumerate(leaves)])


@dataclasses.dataclass(frozen=True)
class Case:
  """One module at a tiny shape: how to build it with policy keywords, its inputs, and chunk-forcing settings."""
  name: str
  nnx_build: Callable[..., nnx.Module]   # (**policy) -> NNX module (rngs given)
  linen_build: Callable[..., Any]        # (**policy) -> Linen module
  arrays: Callable[[], tuple[jax.Array, ...]]
  static: tuple[Any, ...]                # trailing call arguments that stay Python values
  differentiable: tuple[int, ...]        # which arrays get input gradients
  chunk_size: int                        # forces several passes
  memory_budget: int                     # bytes: forces several passes on every platform


CASES = [
    Case('DeformConv', lambda **p: DeformConv(4, 4, 3, rngs=nnx.Rngs(0), **p),
         lambda **p: linen.DeformConv(4, 3, **p), lambda: (normal(1, (1, 5, 5, 4)),), (), (0,),
         chunk_size=4, memory_budget=600),
    Case('DeformRoIPool', lambda **p: DeformRoIPool(2, 2, sampling_ratio=2, hidden_features=(4,), modulated=True,
                                                    rngs=nnx.Rngs(0), **p),
         lambda **p: linen.DeformRoIPool(2, sampling_ratio=2, hidden_features=(4,), modulated=True, **p),
         lambda: (normal(2, (2, 6, 6, 2)), jnp.asarray(ROIS)), (), (0,), chunk_size=3, memory_budget=64),
    Case('DCNv3', lambda **p: DCNv3(4, 3, groups=2, rngs=nnx.Rngs(0), **p),
         lambda **p: linen.DCNv3(3, groups=2, **p), lambda: (normal(3, (1, 4, 5, 4)),), (), (0,),
         chunk_size=6, memory_budget=400),
    Case('DCNv4', lambda **p: DCNv4(8, 3, groups=2, rngs=nnx.Rngs(0), **p),
         lambda **p: linen.DCNv4(3, groups=2, **p), lambda: (normal(4, (1, 4, 5, 8)),), (), (0,),
         chunk_size=6, memory_budget=800),
    # A value projection narrower than d_model (mmcv's value_proj_ratio=0.5), run by the policy test.
    Case('MSDeformAttn', lambda **p: MSDeformAttn(8, 2, 2, 2, value_features=4, rngs=nnx.Rngs(0), **p),
         lambda **p: linen.MSDeformAttn(8, 2, 2, 2, value_features=4, **p),
         lambda: (normal(5, (2, 5, 8)), jnp.asarray(np.random.default_rng(6).uniform(size=(2, 5, 2, 2)), jnp.float32),
                  normal(7, (2, 16, 8))), (SHAPES,), (0, 2), chunk_size=3, memory_budget=128),
]


def nnx_appliers(case: Case) -> tuple[dict[str, Callable], Any]:
  """`{setting: apply(params, *arrays)}` over one shared parameter state (random, the same for every setting)."""
  appliers, params = {}, None
  for key, policy in SETTINGS(case).items():
    graphdef, state = nnx.split(nnx.eval_shape(lambda policy=policy: case.nnx_build(**policy)))
    params = random_like(state, seed=1) if params is None else params
    appliers[key] = lambda p, *xs, g=graphdef: nnx.merge(g, p)(*xs, *case.static)
  return appliers, params


def linen_appliers(case: Case, nnx_params: Any) -> tuple[dict[str, Callable], Any]:
  """The Linen twin's `{setting: apply}` and the NNX parameters in its layout (its init's tree, checked)."""
  modules = {key: case.linen_build(**policy) for key, policy in SETTINGS(case).items()}
  shapes = jax.eval_shape(lambda *xs: modules['default'].init(jax.random.key(0), *xs, *case.static), *case.arrays())
  params = {'params': linen_layout(nnx.to_pure_dict(nnx_params))}
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes)
  return {key: lambda p, *xs, m=m: m.apply(p, *xs, *case.static) for key, m in modules.items()}, params


def linen_layout(tree: dict) -> dict:
  """NNX pure dict -> Linen params: an `nnx.List` of layers `{name: {0: ..}}` is Linen's `name_0`, ..."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
      out.update({f'{key}_{i}': linen_layout(v) for i, v in value.items()})
    else:
      out[key] = linen_layout(value) if isinstance(value, dict) else value
  return out


def SETTINGS(case: Case) -> dict[str, dict]:  # noqa: N802 (a table, read as one)
  return {'default': {}, 'chunks': dict(chunk_size=case.chunk_size), 'budget': dict(memory_budget=case.memory_budget),
          'deterministic_gradients': dict(deterministic_gradients=True)}


def named_jit(fn: Callable, name: str) -> Callable:
  """`jax.jit(fn)` whose call shows in the outer jaxpr under `name` (XLA inlines it: no extra compile)."""
  def call(*args):
    return fn(*args)
  call.__name__ = name
  return jax.jit(call)


def count(jaxpr: jax.extend.core.Jaxpr, primitive: str) -> int:
  """Equations whose primitive name contains `primitive`, nested jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += primitive in eqn.primitive.name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          total += count(inner, primitive)
  return total


@pytest.mark.parametrize('full', [False, pytest.param(True, marks=pytest.mark.slow)], ids=['fast', 'full'])
@pytest.mark.parametrize('case', CASES, ids=lambda c: c.name)
def test_policy_keywords_change_how_a_module_runs_not_what_it_computes(case, full):
  """Forced chunks and `deterministic_gradients=True` give the default output, and the deterministic gradients (w.r.t.
  parameters and inputs) are the same bits on a second call; each keyword visibly reaches the op.

  The NNX module and its Linen twin share one random parameter set (the twins compute the same numbers) and one
  compiled function. Every setting of both is traced, and its jaxpr shows the keyword at work (chunk loops for
  `chunk_size` / `memory_budget`, the sorted-segment-sum VJP for `deterministic_gradients`). The fast tier compiles and
  compares a subset that covers each keyword once (NNX default, chunk_size and deterministic gradients, Linen
  memory_budget); `full` compiles every setting of both and differentiates both.
  """
  fns, nnx_params = nnx_appliers(case)
  linen_fns, linen_params = linen_appliers(case, nnx_params)
  params = {'nnx': nnx_params, 'linen': linen_params}
  calls = {(api, key): named_jit(fn, f'{api}_{key}') for api, table in (('nnx', fns), ('linen', linen_fns))
           for key, fn in table.items()}
  arrays = case.arrays()
  for (api, key), call in calls.items():
    jaxpr = jax.make_jaxpr(call)(params[api], *arrays).jaxpr  # cached: the compiled function reuses the trace
    loops, vjps = count(jaxpr, 'scan'), count(jaxpr, 'custom_vjp')
    assert (loops > 0) == (key in ('chunks', 'budget')), (api, key, loops)
    assert (vjps > 0) == (key == 'deterministic_gradients'), (api, key, vjps)

  compared = list(calls) if full else [('nnx', 'default'), ('nnx', 'chunks'), ('linen', 'budget')]
  differentiated = ['nnx', 'linen'] if full else ['nnx']
  diff = case.differentiable

  def everything(params, arrays, cotangent):
    outs = {f'{api}_{key}': calls[api, key](params[api], *arrays) for api, key in compared}
    grads = {}
    for api in differentiated:
      def det(p, xs, api=api):
        full_arrays = list(arrays)
        for i, x in zip(diff, xs):
          full_arrays[i] = x
        return calls[api, 'deterministic_gradients'](p, *full_arrays)

      outs[f'{api}_deterministic'], vjp = jax.vjp(det, params[api], tuple(arrays[i] for i in diff))
      grads[api] = vjp(cotangent)
    return outs, grads

  cotangent = normal(9, jax.eval_shape(fns['default'], params['nnx'], *arrays).shape)
  run = jax.jit(everything).lower(params, arrays, cotangent).compile()
  outs, grads = run(params, arrays, cotangent)
  _, grads_again = run(params, arrays, cotangent)
  for key, out in outs.items():
    np.testing.assert_allclose(out, outs['nnx_default'], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, grads_again, grads)
  # The gradients are real ones: every differentiated input gets some.
  assert all(float(jnp.abs(g).max()) > 0 for api in differentiated for g in grads[api][1])


BAD = [
    (dict(chunk_size=0), ValueError, 'chunk_size must be a positive int or None'),
    (dict(chunk_size=2.5), ValueError, 'chunk_size must be a positive int or None'),
    (dict(memory_budget=-1), ValueError, 'memory_budget must be a positive int or None'),
    (dict(memory_budget=True), ValueError, 'memory_budget must be a positive int or None'),
    (dict(deterministic_gradients='yes'), TypeError, 'deterministic_gradients must be a bool'),
    (dict(deterministic_gradients=1), TypeError, 'deterministic_gradients must be a bool'),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.name)
def test_bad_policy_values_are_refused_by_name(case):
  for policy, error, message in BAD:
    with pytest.raises(error, match=f'{case.name}: {message}'):
      case.nnx_build(**policy)
    with pytest.raises(error, match=f'{case.name}: {message}'):
      case.linen_build(**policy).init(jax.random.key(0), *case.arrays(), *case.static)


def test_non_bool_aligned_is_a_type_error():
  with pytest.raises(TypeError, match='deform_roi_pool: aligned must be a bool, got 1'):
    deform_roi_pool(jnp.ones((1, 4, 4, 2)), jnp.asarray(ROIS[:1]), output_size=2, aligned=1)


def test_value_features_sets_the_value_width():
  """value_proj maps d_model -> value_features and output_proj back, in both twins (the MSDeformAttn case of the
  policy test runs them at value_features=4 and compares the twins' outputs)."""
  query, ref, inputs = CASES[-1].arrays()
  for value_features, width in ((None, 8), (4, 4)):
    layer = nnx.eval_shape(lambda v=value_features: MSDeformAttn(8, 2, 2, 2, value_features=v, rngs=nnx.Rngs(0)))
    assert layer.value_proj.kernel.shape == (8, width) and layer.output_proj.kernel.shape == (width, 8)
    twin = linen.MSDeformAttn(8, 2, 2, 2, value_features=value_features)
    params = jax.eval_shape(lambda *xs, t=twin: t.init(jax.random.key(0), *xs, SHAPES), query, ref, inputs)
    assert params['params']['value_proj']['kernel'].shape == (8, width)
    assert params['params']['output_proj']['kernel'].shape == (width, 8)


@pytest.mark.parametrize('value_features, error', [(6, 'divisible by num_heads=4'), (0, 'positive int'),
                                                   (True, 'positive int')])
def test_value_features_is_checked(value_features, error):
  with pytest.raises(ValueError, match=f'MSDeformAttn: value_features.*{error}'):
    MSDeformAttn(8, 4, 1, 1, value_features=value_features, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=f'MSDeformAttn: value_features.*{error}'):
    linen.MSDeformAttn(8, 4, 1, 1, value_features=value_features).init(
        jax.random.key(0), jnp.ones((1, 2, 8)), jnp.ones((1, 2, 1, 2)), jnp.ones((1, 4, 8)), [(2, 2)])


def test_linen_dcnv3_and_dcnv4_share_one_keyword_only_field_order():
  names = {cls: [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name', '_')]
           for cls in (linen.DCNv3, linen.DCNv4)}
  shared = [n for n in names[linen.DCNv3] if n in names[linen.DCNv4]]
  assert shared == [n for n in names[linen.DCNv4] if n in names[linen.DCNv3]]
  assert shared[:8] == ['kernel_size', 'groups', 'padding', 'kernel_dilation', 'offset_scale', 'dw_kernel_size',
                        'center_feature_scale', 'remove_center']
  for cls in (linen.DCNv3, linen.DCNv4):
    with pytest.raises(TypeError):
      cls(3, 4)  # only the kernel size is positional
  # The NNX constructors take the shared arguments in the same order, after (channels, kernel_size).
  for nnx_cls in (DCNv3, DCNv4):
    params = list(inspect.signature(nnx_cls.__init__).parameters)
    assert [p for p in params if p in shared] == shared
    assert inspect.signature(nnx_cls.__init__).parameters['groups'].kind is inspect.Parameter.KEYWORD_ONLY
  fields = dataclasses.fields(linen.MSDeformAttn)
  assert [f.name for f in fields if not f.kw_only] == ['d_model', 'num_heads', 'num_levels', 'num_points']


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.name)
def test_train_and_eval_modes_leave_the_policy_alone(case):
  """`nnx.Module.train()` / `.eval()` set every attribute named `deterministic` (dropout's flag); the gradient policy
  is held apart, so switching modes never turns requested bit-identical gradients off (or on)."""
  for requested in (True, False):
    module = nnx.eval_shape(lambda requested=requested: case.nnx_build(deterministic_gradients=requested, chunk_size=5))
    for mode in (module.train, module.eval, module.train):
      mode()
      assert module.policy == _common.SamplingPolicy(chunk_size=5, deterministic_gradients=requested)


def _converter_cases() -> dict[str, tuple[Callable, Callable[[], tuple]]]:
  """Each single-layer converter with a small state (the layout its docstring shows) and a call's inputs."""
  from deformjax import convert
  from deformjax.convert.deformable_detr import from_deformable_detr_attention

  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape) * 0.3
  c, g = 16, 4
  mmcv = {'weight': normal(8, c, 3, 3), 'bias': normal(8), 'conv_offset.weight': normal(27, c, 3, 3),
          'conv_offset.bias': normal(27)}
  dcnv3 = {'input_proj.weight': normal(c, c), 'input_proj.bias': normal(c), 'output_proj.weight': normal(c, c),
           'output_proj.bias': normal(c), 'dw_conv.0.weight': normal(c, 1, 3, 3), 'dw_conv.0.bias': normal(c),
           'dw_conv.1.1.weight': np.ones(c), 'dw_conv.1.1.bias': np.zeros(c), 'offset.weight': normal(g * 18, c),
           'offset.bias': normal(g * 18), 'mask.weight': normal(g * 9, c), 'mask.bias': normal(g * 9)}
  dcnv4 = {'value_proj.weight': normal(c, c), 'value_proj.bias': normal(c), 'output_proj.weight': normal(c, c),
           'output_proj.bias': normal(c), 'offset_mask.weight': normal(56, c), 'offset_mask.bias': normal(56)}
  m, lv, p = 2, 2, 2
  detr = {'sampling_offsets.weight': normal(m * lv * p * 2, c), 'sampling_offsets.bias': normal(m * lv * p * 2),
          'attention_weights.weight': normal(m * lv * p, c), 'attention_weights.bias': normal(m * lv * p),
          'value_proj.weight': normal(c, c), 'value_proj.bias': normal(c), 'output_proj.weight': normal(c, c),
          'output_proj.bias': normal(c)}
  image = lambda: (rng.normal(size=(1, 6, 6, c)).astype(np.float32),)
  shapes = [(4, 4), (2, 2)]
  attention = lambda: (rng.normal(size=(1, 5, c)).astype(np.float32), rng.uniform(size=(1, 5, lv, 2)).astype(
      np.float32), rng.normal(size=(1, 20, c)).astype(np.float32), shapes)
  torchvision_inputs = lambda: (image()[0], rng.normal(size=(1, 6, 6, 18)).astype(np.float32))
  weight, bias = normal(8, c, 3, 3), normal(8)
  return {
      'from_torchvision': (lambda **kw: convert.from_torchvision(weight, bias, padding=1, **kw),
                           torchvision_inputs),
      'from_mmcv': (lambda **kw: convert.from_mmcv(mmcv, padding=1, **kw), image),
      'from_dcnv3': (lambda **kw: convert.from_dcnv3(dcnv3, groups=g, **kw), image),
      'from_dcnv4': (lambda **kw: convert.from_dcnv4(dcnv4, groups=2, **kw), image),
      'from_deformable_detr_attention': (lambda **kw: from_deformable_detr_attention(
          detr, num_heads=m, num_levels=lv, num_points=p, **kw), attention),
  }


@pytest.mark.parametrize('name', list(_converter_cases()))
def test_converters_pass_the_module_options_through(name):
  """A ported layer takes the module's own options (compute dtype, execution policy) as the constructor does:
  the policy reaches the module and changes nothing computed; the compute dtype is the one asked for."""
  build, inputs = _converter_cases()[name]
  args = inputs()
  base = build()
  layer = build(dtype=jnp.bfloat16, chunk_size=64, memory_budget=2**20, deterministic_gradients=True)
  assert layer.policy == _common.SamplingPolicy(64, 2**20, True)
  with jax.numpy_dtype_promotion('standard'):  # flax's LayerNorm (in DCNv3) promotes bfloat16 stats to float32
    y = layer(*args)
  y_base = base(*args)
  assert y.dtype == jnp.bfloat16 and y_base.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), y_base, atol=0.1 * float(np.abs(y_base).max()))
  exact = build(chunk_size=64, deterministic_gradients=True)
  np.testing.assert_allclose(exact(*args), y_base, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='chunk_size'):
    build(chunk_size=0)
