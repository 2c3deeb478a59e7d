"""ONNX export: every public op and module converts to standard operators and onnxruntime reproduces JAX.

Each case exports with a symbolic batch, runs the model in onnxruntime at batch
sizes other than the example's, and compares with the jitted JAX function in
float32 (1e-5) on random offsets that include out-of-image and non-finite points.
Skipped where jax2onnx or onnxruntime is not installed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip('jax2onnx')
ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

from deformjax.export import STANDARD_DOMAINS, ExportError, op_types, to_onnx  # noqa: E402
from deformjax.models import CifarNet, ConvClassifier  # noqa: E402
from deformjax.nn import DeformConv, DeformRoIPool  # noqa: E402
from deformjax.nn import linen as dlinen  # noqa: E402
from deformjax.ops import bilinear_sample, deform_conv2d, deform_roi_pool, output_size  # noqa: E402

# Structure an ONNX graph of one pass never needs: loops and branches are what
# the CPU chunking and the per-platform switch would have left behind.
CONTROL_FLOW = {'Loop', 'If', 'Scan'}


def session(model):
  return ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])


def run(model, *inputs):
  sess = session(model)
  names = [i.name for i in sess.get_inputs()]
  return sess.run(None, dict(zip(names, inputs)))


def hostile(a: np.ndarray, rng, fraction=0.05) -> np.ndarray:
  """A copy of `a` with a few entries nan, +-inf, +-1e30 and far outside any image."""
  a = a.copy()
  flat = a.reshape(-1)
  picks = rng.choice(flat.size, size=max(6, int(fraction * flat.size)), replace=False)
  flat[picks] = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 40.0, -40.0], np.float32), size=picks.size)
  return a


def assert_standard(model):
  counts = op_types(model)
  assert counts, 'empty graph'
  custom = {k for k in counts if k[0] not in STANDARD_DOMAINS}
  assert not custom, f'custom-domain operators {custom}'
  assert not CONTROL_FLOW & {t for _, t in counts}, f'control flow in a one-pass graph: {sorted(counts)}'
  return {t for _, t in counts}


def assert_matches(model, fn, batches, make_inputs, atol=1e-5):
  jitted = jax.jit(fn)
  sess = session(model)
  names = [i.name for i in sess.get_inputs()]
  for b in batches:
    inputs = make_inputs(b)
    got = sess.run(None, dict(zip(names, inputs)))
    want = jax.tree.leaves(jitted(*inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=atol)


def f32(rng, *shape, low=None, high=None):
  if low is None:
    return rng.normal(size=shape).astype(np.float32)
  return rng.uniform(low, high, size=shape).astype(np.float32)


def test_bilinear_sample():
  rng = np.random.default_rng(0)

  def make(b):
    return f32(rng, b, 5, 6, 3), hostile(f32(rng, b, 40, 2, low=-3, high=8), rng)

  model = to_onnx(bilinear_sample, make(2))
  types = assert_standard(model)
  assert {'Gather', 'Where', 'IsNaN'} <= types
  assert_matches(model, bilinear_sample, (1, 3), make)


CONV_CASES = {
    # name: (C_in, C_out, (kh, kw), H, W, keyword arguments, masked, offset_groups)
    'plain': (4, 6, (3, 3), 7, 6, dict(padding=1), False, 1),
    'mask-bias': (4, 6, (3, 3), 7, 6, dict(padding=1), True, 1),
    'groups-offset-groups': (4, 6, (3, 3), 7, 6, dict(padding=1, groups=2, offset_groups=2), True, 2),
    'stride-dilation-padding': (3, 5, (3, 2), 9, 8, dict(strides=(2, 1), dilation=(1, 2), padding=((2, 0), (1, 3))),
                                True, 1),
    'same': (3, 4, (3, 3), 6, 7, dict(padding='SAME', strides=2), False, 1),
}


# Two cases in the fast tier; the rest (each a few seconds of export) in the slow one.
FAST_CONV_CASES = ('groups-offset-groups', 'stride-dilation-padding')


@pytest.mark.parametrize('case', [c if c in FAST_CONV_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CONV_CASES])
def test_deform_conv2d(case):
  cin, cout, (kh, kw), h, w, kwargs, masked, og = CONV_CASES[case]
  rng = np.random.default_rng(1)
  groups = kwargs.get('groups', 1)
  kernel = f32(rng, kh, kw, cin // groups, cout)
  bias = f32(rng, cout) if masked else None
  (ho, wo), _ = output_size(
      (h, w), (kh, kw), kwargs.get('strides', 1), kwargs.get('padding', 0), kwargs.get('dilation', 1))

  def fn(x, off, *m):
    return deform_conv2d(x, off, kernel, m[0] if m else None, bias, **kwargs)

  def make(b):
    off = hostile(f32(rng, b, ho, wo, og * kh * kw * 2, low=-4, high=4), rng)
    mask = (f32(rng, b, ho, wo, og * kh * kw, low=-1, high=2),) if masked else ()
    return (f32(rng, b, h, w, cin), off) + mask

  model = to_onnx(fn, make(2))
  assert {'Gather'} <= assert_standard(model)
  assert_matches(model, fn, (1, 3), make)


@pytest.mark.slow
def test_deform_conv2d_deterministic_inference_is_the_same_graph_of_standard_ops():
  rng = np.random.default_rng(2)
  kernel = f32(rng, 3, 3, 4, 4)
  fn = functools.partial(deform_conv2d, kernel=kernel, padding=1, deterministic_gradients=True)

  def make(b):
    return f32(rng, b, 5, 5, 4), f32(rng, b, 5, 5, 18, low=-3, high=3)

  model = to_onnx(lambda x, off: fn(x, off), make(2))
  assert_standard(model)
  assert_matches(model, lambda x, off: fn(x, off), (2,), make)


def test_deform_roi_pool_features_and_rois_batch_apart():
  rng = np.random.default_rng(3)

  def rois(r):
    xy = rng.uniform(-2, 14, size=(r, 4)).astype(np.float32)
    return np.concatenate([rng.integers(0, 2, size=(r, 1)).astype(np.float32), xy], axis=1)

  def fn(feats, boxes, offsets):
    return deform_roi_pool(feats, boxes, offsets, output_size=3, spatial_scale=0.5, sampling_ratio=2)

  model = to_onnx(fn, (f32(rng, 2, 8, 8, 3), rois(4), f32(rng, 4, 3, 3, 2)), dynamic_batch=('N', 'R', 'R'))
  assert_standard(model)
  dims = [d.dim_param or d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim]
  assert dims == ['R', 5]
  assert_matches(model, fn, (5, 1), lambda r: (f32(rng, 2, 8, 8, 3), rois(r), hostile(f32(rng, r, 3, 3, 2), rng)))


def randomised(module, seed=0, scale=0.3):
  """`module` with every parameter random (fresh offset predictors are zero, which would test no sampling)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rng = np.random.default_rng(seed)  # numpy: one eager jax.random call per shape would compile each
  params = jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params)
  return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize('modulated', [pytest.param(False, marks=pytest.mark.slow), True])
def test_deform_conv_module(modulated):
  layer = randomised(DeformConv(4, 6, 3, padding=1, offset_groups=2, modulated=modulated, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(4)
  model = to_onnx(layer, f32(rng, 2, 6, 6, 4))
  assert_standard(model)
  assert_matches(model, layer, (1, 3), lambda b: (f32(rng, b, 6, 6, 4) * 3,))


@pytest.mark.slow
def test_deform_roi_pool_module():
  pool = randomised(DeformRoIPool(3, 2, hidden_features=(8,), sampling_ratio=2, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(5)
  rois = lambda r: np.concatenate([np.zeros((r, 1), np.float32), f32(rng, r, 4, low=0, high=9)], axis=1)
  model = to_onnx(pool, (f32(rng, 1, 10, 10, 3), rois(3)), dynamic_batch=(None, 'R'))
  assert_standard(model)
  assert_matches(model, pool, (2, 4), lambda r: (f32(rng, 1, 10, 10, 3), rois(r)))


@pytest.mark.parametrize('build, shape', [
    (lambda: ConvClassifier(1, 10, width=8, deformable=2, modulated=True, dropout=0.2, rngs=nnx.Rngs(0)),
     (14, 14, 1)),
    pytest.param(lambda: CifarNet(3, 10, image_size=16, deformable='all', rngs=nnx.Rngs(0)), (16, 16, 3),
                 marks=pytest.mark.slow),
], ids=['conv5', 'cifarnet'])
def test_classifiers(build, shape):
  net = randomised(build(), scale=0.2)
  rng = np.random.default_rng(6)
  model = to_onnx(net, f32(rng, 2, *shape))
  assert {'Conv', 'Gather'} <= assert_standard(model)
  assert_matches(model, net, (1, 3), lambda b: (f32(rng, b, *shape),), atol=1e-4)


@pytest.mark.slow
def test_linen_twin_through_apply():
  layer = dlinen.DeformConv(5, 3, padding=1, modulated=True)
  rng = np.random.default_rng(7)
  variables = layer.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2), jnp.float32))
  variables = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(f32(rng, *p.shape), p.dtype), variables)
  fn = functools.partial(layer.apply, variables)
  model = to_onnx(fn, f32(rng, 2, 6, 6, 2))
  assert_standard(model)
  assert_matches(model, fn, (3,), lambda b: (f32(rng, b, 6, 6, 2),))


def test_file_written_and_fixed_batch(tmp_path):
  rng = np.random.default_rng(8)
  x = f32(rng, 2, 5, 5, 2)
  target = tmp_path / 'sample.onnx'
  model = to_onnx(bilinear_sample, (x, f32(rng, 2, 4, 2, low=-1, high=5)), dynamic_batch=False, path=target)
  loaded = onnx.load(target)
  assert loaded.graph == model.graph
  assert [d.dim_value for d in loaded.graph.input[0].type.tensor_type.shape.dim] == [2, 5, 5, 2]


def test_dropout_in_training_mode_is_refused():
  dropout = nnx.Dropout(0.5)
  with pytest.raises(ExportError, match=r'draws random numbers .*train=False'):
    to_onnx(lambda x: dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=1)), np.zeros((2, 3), np.float32))


def test_state_updates_are_refused():
  class Normalised(nnx.Module):
    def __init__(self):
      self.norm = nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.norm(x)

  with pytest.raises(ExportError, match=r'updates its state .*batch_stats|updates its state .*mean'):
    to_onnx(Normalised(), np.zeros((2, 4, 4, 3), np.float32))


@pytest.mark.parametrize('dynamic_batch', [('N',), 'N', ('N', '1x')], ids=['too-few', 'string', 'not-identifier'])
def test_bad_dynamic_batch_is_named(dynamic_batch):
  rng = np.random.default_rng(9)
  with pytest.raises(ValueError, match=r'to_onnx: dynamic_batch must be True, False or one name'):
    to_onnx(bilinear_sample, (f32(rng, 2, 5, 5, 2), f32(rng, 2, 4, 2)), dynamic_batch=dynamic_batch)


def test_bad_arguments_keep_the_ops_one_line_errors():
  """Traced for ONNX, a wrong shape fails as it does in JAX: one line naming the argument."""
  rng = np.random.default_rng(10)
  kernel = f32(rng, 3, 3, 4, 4)
  fn = lambda x, off: deform_conv2d(x, off, kernel, padding=1)
  x, off = f32(rng, 2, 5, 5, 4), f32(rng, 2, 5, 5, 17)
  with pytest.raises(ValueError) as in_jax:
    fn(x, off)
  with pytest.raises(ValueError) as in_onnx:
    to_onnx(fn, (x, off))
  assert str(in_onnx.value) == str(in_jax.value).replace('got (2,', 'got (N,')  # the batch is symbolic there
  assert str(in_jax.value).startswith('deform_conv2d: offsets must have shape') and '\n' not in str(in_jax.value)
  with pytest.raises(ValueError, match=r'deform_conv2d: offsets must have shape \[N, Ho, Wo, offset_groups\*kh\*kw\*2\]'
                                       r' = \(N, 5, 5, 18\), got \(N, 5, 4, 18\)'):
    to_onnx(fn, (x, f32(rng, 2, 5, 4, 18)))


def test_dcnv3_and_dcnv4_ops():
  from deformjax.ops import dcnv3, dcnv4, offset_mask_channels

  rng = np.random.default_rng(11)
  g, taps = 2, 9
  kw = dict(kernel_size=3, padding=1, groups=g, offset_scale=1.5)
  f3 = lambda x, off, m: dcnv3(x, off, m, **kw)
  f4 = lambda x, om: dcnv4(x, om, **kw)

  def make3(b):
    return (f32(rng, b, 6, 7, 4), hostile(f32(rng, b, 6, 7, g * taps * 2, low=-4, high=4), rng),
            f32(rng, b, 6, 7, g * taps, low=0, high=1))

  def make4(b):
    return f32(rng, b, 6, 7, 4), hostile(f32(rng, b, 6, 7, offset_mask_channels(g, taps), low=-4, high=4), rng)

  for fn, make in ((f3, make3), (f4, make4)):
    model = to_onnx(fn, make(2))
    assert {'Gather'} <= assert_standard(model)
    assert_matches(model, fn, (1, 3), make)


def test_ms_deform_attn_op():
  from deformjax.ops import ms_deform_attn

  rng = np.random.default_rng(12)
  shapes, heads, d, lq, points = ((5, 6), (3, 2)), 2, 4, 7, 3
  fn = lambda value, loc, w: ms_deform_attn(value, shapes, loc, w)

  def make(b):
    loc = hostile(f32(rng, b, lq, heads, len(shapes), points, 2, low=-0.2, high=1.2), rng)
    return f32(rng, b, 36, heads, d), loc, f32(rng, b, lq, heads, len(shapes), points, low=0, high=1)

  model = to_onnx(fn, make(2))
  assert_standard(model)
  assert_matches(model, fn, (1, 3), make)


@pytest.mark.slow
def test_family_modules():
  from deformjax.nn import DCNv3, DCNv4, MSDeformAttn

  rng = np.random.default_rng(13)
  for layer in (DCNv3(8, 3, groups=2, rngs=nnx.Rngs(0)), DCNv4(8, 3, groups=2, rngs=nnx.Rngs(0))):
    layer = randomised(layer)
    model = to_onnx(layer, f32(rng, 2, 5, 5, 8))
    assert_standard(model)
    assert_matches(model, layer, (1, 3), lambda b: (f32(rng, b, 5, 5, 8),))
  shapes = ((4, 4), (2, 3))
  attn = randomised(MSDeformAttn(8, num_heads=2, num_levels=2, num_points=2, rngs=nnx.Rngs(0)))
  fn = lambda query, ref, inputs: attn(query, ref, inputs, shapes)
  make = lambda b: (f32(rng, b, 5, 8), f32(rng, b, 5, 2, 2, low=-0.1, high=1.1), f32(rng, b, 22, 8))
  model = to_onnx(fn, make(2))
  assert_standard(model)
  assert_matches(model, fn, (1, 3), make)


@pytest.mark.parametrize('case', ['mask-bias'] + [pytest.param(c, marks=pytest.mark.slow) for c in
                                                  ('stride-dilation-padding', 'groups-offset-groups', 'plain')])
def test_opt_in_onnx_deform_conv_equals_the_gather_graph(case):
  """`onnx_deform_conv=True`: one ONNX DeformConv node (opset 19), same values, hostile points included."""
  cin, cout, (kh, kw), h, w, kwargs, masked, og = CONV_CASES[case]
  rng = np.random.default_rng(14)
  kernel = f32(rng, kh, kw, cin // kwargs.get('groups', 1), cout)
  bias = f32(rng, cout) if masked else None
  (ho, wo), _ = output_size((h, w), (kh, kw), kwargs.get('strides', 1), kwargs.get('padding', 0),
                            kwargs.get('dilation', 1))

  def fn(x, off, *m):
    return deform_conv2d(x, off, kernel, m[0] if m else None, bias, **kwargs)

  def make(b):
    off = hostile(f32(rng, b, ho, wo, og * kh * kw * 2, low=-4, high=4), rng)
    return (f32(rng, b, h, w, cin), off) + ((f32(rng, b, ho, wo, og * kh * kw, low=-1, high=2),) if masked else ())

  model = to_onnx(fn, make(2), onnx_deform_conv=True)
  types = assert_standard(model)
  assert 'DeformConv' in types and not {'Floor', 'Where'} & types, types  # no bilinear gather graph left
  assert {o.domain: o.version for o in model.opset_import}[''] == 19
  # The node's result carries its type and shape, the symbolic batch by name (onnx_ir's types, set by the lowering).
  (node,) = [n for n in model.graph.node if n.op_type == 'DeformConv']
  (info,) = [v for v in list(model.graph.value_info) + list(model.graph.output) if v.name == node.output[0]]
  assert info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
  assert [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim] == ['N', cout, ho, wo]
  assert_matches(model, fn, (1, 3), make)


@pytest.mark.slow
def test_opt_in_onnx_deform_conv_in_a_classifier():
  net = randomised(ConvClassifier(1, 10, width=8, deformable=2, modulated=True, rngs=nnx.Rngs(0)), scale=0.2)
  rng = np.random.default_rng(15)
  model = to_onnx(net, f32(rng, 2, 14, 14, 1), onnx_deform_conv=True)
  counts = op_types(model)
  assert counts[('', 'DeformConv')] == 2 and ('', 'Floor') not in counts
  assert_matches(model, net, (1, 3), lambda b: (f32(rng, b, 14, 14, 1),), atol=1e-4)


def test_opt_in_onnx_deform_conv_needs_opset_19():
  with pytest.raises(ValueError, match=r'to_onnx: opset must be an int >= 19 \(DeformConv is opset 19\), got 17'):
    to_onnx(bilinear_sample, (np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 2, 2), np.float32)), opset=17,
            onnx_deform_conv=True)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['internimage', 'flash_internimage'])
def test_internimage_micro_converted_from_a_state_dict(kind):
  """The whole classifier as a user ports it (a reference state dict through the converter), exported with a
  symbolic batch to standard operators: onnxruntime reproduces the jitted model at two batch sizes."""
  from deformjax.convert import internimage as convert
  from deformjax.models import FlashInternImage, InternImage

  cls, load = ((InternImage, convert.from_internimage) if kind == 'internimage'
               else (FlashInternImage, convert.from_flash_internimage))
  rng = np.random.default_rng(0)
  shaped = nnx.eval_shape(lambda: cls('micro', num_classes=5, rngs=nnx.Rngs(0)))
  nnx.update(shaped, jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), nnx.state(shaped)))
  state = convert.to_internimage_state_dict(shaped)
  state = {k: np.abs(v) + 0.5 if k.endswith('running_var') else v for k, v in state.items()}
  model = load(state, 'micro')
  x = f32(rng, 2, 32, 32, 3)
  onnx_model = to_onnx(model, (x,))
  assert_standard(onnx_model)
  assert_matches(onnx_model, model, (2, 3), lambda b: (f32(np.random.default_rng(b), b, 32, 32, 3),), atol=1e-5)


def test_the_private_jax2onnx_names_export_reads_are_there(monkeypatch):
  """jax2onnx has no public way to register part of its plugin tree, so the export's lean registry reads two private
  names of `jax2onnx.plugins.plugin_system` (`deformjax.export._JAX2ONNX_PRIVATE_NAMES`) and the `[onnx]` extra pins
  jax2onnx to the series they were checked on. A release that drops, renames or stops reading one fails here by
  name: without them every export would still be right, but would import jax2onnx's whole plugin tree (about 20 s
  of CPU the first time). The registry restores jax2onnx's state after the block, and changes nothing where a name
  is missing."""
  import importlib.metadata
  import inspect
  import pathlib
  import tomllib

  from jax2onnx.plugins import plugin_system
  from packaging.requirements import Requirement

  from deformjax import export

  version = importlib.metadata.version('jax2onnx')
  missing = [n for n in export._JAX2ONNX_PRIVATE_NAMES if not hasattr(plugin_system, n)]
  assert not missing, (f'jax2onnx {version} has no jax2onnx.plugins.plugin_system.{", ".join(missing)}: '
                       'deformjax.export._lean_plugin_registry needs another way to skip the full plugin import')
  assert isinstance(plugin_system._already_imported_plugins, bool)
  assert list(inspect.signature(plugin_system._import_tree).parameters) == ['root_dir', 'pkg_prefix']
  # The flag is what the (public) full import checks first; a flag it no longer reads would skip nothing.
  assert '_already_imported_plugins' in plugin_system.import_all_plugins.__code__.co_names, (
      f'jax2onnx {version}: import_all_plugins no longer reads _already_imported_plugins')
  pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / 'pyproject.toml').read_text())
  (pin,) = [Requirement(r) for r in pyproject['project']['optional-dependencies']['onnx']
            if Requirement(r).name == 'jax2onnx']
  assert pin.specifier.contains(version), f'jax2onnx {version} is outside the [onnx] extra\'s tested {pin}'

  before = plugin_system._already_imported_plugins
  with export._lean_plugin_registry():
    assert plugin_system._already_imported_plugins is True
  assert plugin_system._already_imported_plugins is before
  monkeypatch.setattr(plugin_system, '_already_imported_plugins', False)
  monkeypatch.delattr(plugin_system, '_import_tree')
  with export._lean_plugin_registry():  # another layout: jax2onnx is left to import what it wants
    assert plugin_system._already_imported_plugins is False


@pytest.mark.slow
def test_deformable_detr_tiny_with_a_symbolic_batch():
  """A tiny Deformable DETR ported from a transformers-named state dict, exported with a symbolic batch (images and
  their padding masks): onnxruntime reproduces the jitted detector's logits and boxes at two batch sizes."""
  from deformjax.convert.deformable_detr import from_deformable_detr
  from tests.test_deformable_detr import TINY, random_state

  detector = from_deformable_detr(random_state(TINY), TINY)

  def detect(x, mask):
    out = detector(x, mask)
    return out.logits, out.pred_boxes

  def inputs(b):
    rng = np.random.default_rng(b)
    mask = np.ones((b, 40, 36), bool)
    mask[-1, 29:] = False
    return f32(rng, b, 40, 36, 3), mask

  onnx_model = to_onnx(detect, inputs(2))
  assert_standard(onnx_model)
  assert_matches(onnx_model, detect, (2, 3), inputs, atol=1e-4)
