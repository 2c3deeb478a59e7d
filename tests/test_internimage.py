"""InternImage / FlashInternImage: shapes, gradients, dtypes, remat, export, parameter counts, checkpoint conversion.

The slow tier compares with the reference PyTorch models themselves, loaded from a checkout of
their repositories (not pip-installable): `DEFORMJAX_INTERNIMAGE_SRC` names InternImage's
`classification/` folder, `DEFORMJAX_DCNV4_SRC` the root of a DCNv4 checkout; skipped where unset
or where torch is absent. Both model files import compiled CUDA extensions at module level:

- InternImage: the extension module (`DCNv3`) and its `pkg_resources` version probe are stubbed and
  the model runs its own pure-PyTorch core (`core_op='DCNv3_pytorch'`, `dcnv3_core_pytorch`).
- FlashInternImage: DCNv4 has no pure-PyTorch path upstream. The reference `DCNv4` module file
  (`DCNv4_op/DCNv4/modules/dcnv4.py`: its parameters, initialisation and forward) is loaded as is,
  with its `DCNv4Function` replaced by `references.torch_reference.dcnv4_core_torch`, a translation of the CUDA forward
  kernel (`forward_kernel_dcn` in `dcnv4_im2col_cuda.cuh`) to `grid_sample`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import types
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.convert import internimage as convert
from deformjax.models import (
  FLASH_INTERNIMAGE_PRESETS,
  INTERNIMAGE_PRESETS,
  FlashInternImage,
  InternImage,
)
from deformjax.nn import DCNv4

MODELS = {'internimage': (InternImage, convert.from_internimage),
          'flash': (FlashInternImage, convert.from_flash_internimage)}
# The S / B variants' options (layer scale, post-norm, a depthwise conv in DCNv4's offset branch) on the micro model.
VARIANT = dict(layer_scale=0.5, post_norm=True, dw_kernel_size=3, offset_scale=0.5)


# One level of one block (stem, DCN block, level norm, head): the gradient tests' model. Compiling a model's
# backward costs seconds per DCN block on XLA:CPU; the 4-level 'micro' preset is kept for forward tests.
ONE_LEVEL = dict(depths=(1,), groups=(1,))


def micro(kind: str, **changes) -> object:
  presets = INTERNIMAGE_PRESETS if kind == 'internimage' else FLASH_INTERNIMAGE_PRESETS
  return dataclasses.replace(presets['micro'], **changes)


def image(n=2, size=32, dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), dtype)


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """Our parameter shape -> the reference's (`state_entries` layouts)."""
  if layout == 'linear':
    return shape[::-1]
  if layout == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def build(kind: str, preset, seed: int = 0, **kw):
  """A model with random parameters drawn in numpy and loaded through the converter: a model built eagerly
  compiles each initialiser per parameter shape (~20 s for 'micro' on the shared 2-core CPU); this takes ~1 s."""
  cls, load = MODELS[kind]
  abstract = nnx.eval_shape(lambda: cls(preset, rngs=nnx.Rngs(0), **kw))
  rng = np.random.default_rng(seed)
  state = {}
  for key, var, layout in convert.state_entries(abstract):
    shape = torch_shape(var.shape, layout)
    if key.endswith('running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    elif layout == 'same' and key.endswith(('.weight', 'gamma1', 'gamma2')):  # norm scales, layer scale
      value = 1 + 0.1 * rng.normal(size=shape)
    else:  # offsets included: the sampling points move off the grid
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 16)
    state[key] = value.astype(np.float32)
  return load(state, preset, **kw)


def cheap_abstract_builds():
  """Building abstractly, flax probes the `sharding` of each traced RNG counter it updates; for a tracer JAX
  answers with an AttributeError whose message walks the whole trace (then discarded): quadratic in the model's
  size, ~20 s for T/S/B of both models on 2 cores. The message is not needed here. (A private JAX name: where
  it moved, the builds are only slower.)"""
  try:
    from jax._src.interpreters import partial_eval as pe
    return mock.patch.object(pe.DynamicJaxprTracer, '_origin_msg', lambda self: '')
  except (ImportError, AttributeError):
    return contextlib.nullcontext()


def param_count(model) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


# ------------------------------------------------------------------------------------------------- fast tier


@pytest.mark.parametrize('kind', MODELS)
def test_forward_shapes_under_jit(kind):
  cls, _ = MODELS[kind]
  f, state = forward(build(kind, 'micro', num_classes=7))
  logits = f(state, image())
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  headless = nnx.eval_shape(lambda: cls('micro', num_classes=0, rngs=nnx.Rngs(0)))
  f, state = forward(headless)  # num_classes=0: the pooled features, 1.5 times the last width (128)
  assert jax.eval_shape(f, state, image(3, 64)).shape == (3, 192)


def test_pyramid_returns_each_levels_map_before_its_downsampling():
  """`pyramid` (the detection backbones' output): level i at stride 2**(i + 2) and width C * 2**i; the last level's
  map is what the classifier pools (its conv_head and mean give `features`)."""
  model = build('internimage', 'micro', num_classes=0)
  x = image(1, 64)
  maps, pooled = nnx.jit(lambda m, x: (m.pyramid(x), m.features(x)))(model, x)
  assert [m.shape for m in maps] == [(1, 16 // 2**i, 16 // 2**i, 16 * 2**i) for i in range(4)]
  assert model.pyramid_channels((1, 2, 3)) == (32, 64, 128)
  head = nnx.jit(lambda m, y: jnp.mean(m.conv_head(y, False), axis=(1, 2)))(model, maps[-1])
  np.testing.assert_allclose(np.asarray(head), np.asarray(pooled), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r'out_indices must be increasing levels among 0..3, got \(2, 1\)'):
    model.pyramid(x, (2, 1))


@pytest.mark.slow
def test_bfloat16_forward():
  """bfloat16 compute, float32 logits near the float32 model's (InternImage: its LayerNorms and softmax are the
  low-precision hazards; FlashInternImage's DCNv4 bfloat16 path is tested with the module)."""
  kind = 'internimage'
  cfg = micro(kind, **ONE_LEVEL)
  f32, state32 = forward(build(kind, cfg, num_classes=7))
  bf16, state16 = forward(build(kind, cfg, num_classes=7, dtype=jnp.bfloat16))
  ref = f32(state32, image())
  with jax.numpy_dtype_promotion('standard'):  # flax's LayerNorm promotes bfloat16 with float32 implicitly
    out = bf16(state16, image())
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_input_shape_error_names_the_argument():
  model = nnx.eval_shape(lambda: InternImage('micro', rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'x must have shape \[N, H, W, 3\], got \(2, 32, 32, 1\)'):
    model(jnp.zeros((2, 32, 32, 1), jnp.float32))
  with pytest.raises(ValueError, match='preset must be'):
    InternImage('huge', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'groups\[1\]=3 must divide'):
    dataclasses.replace(INTERNIMAGE_PRESETS['micro'], groups=(1, 3, 4, 8))


def train_step_grads(kind, cfg, remat):
  """Loss, updated BatchNorm statistics and parameter gradients of one training-mode step (head BatchNorm on
  batch statistics, drop path on)."""
  model = build(kind, cfg, num_classes=5, remat=remat)

  @nnx.jit
  def step(model, x):
    def loss(model):
      return jnp.mean(jax.nn.log_softmax(model(x, train=True, rngs=nnx.Rngs(dropout=3)))[:, 0])
    return nnx.value_and_grad(loss)(model)

  with jax.numpy_dtype_promotion('standard'):  # flax's LayerNorm promotes with float32 implicitly
    value, grads = step(model, image(4, 16))
  return value, nnx.state(model, nnx.BatchStat), grads


def check_gradients(kind, stats, grads):
  """Finite gradients, nonzero into the zero-initialised offset head (the sampling points learn); the head's
  running statistics moved."""
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  head = 'offset' if kind == 'internimage' else 'offset_mask'
  g = getattr(grads['levels'][0]['blocks'][0]['dcn'], head)['kernel'][...]
  assert float(jnp.abs(g).max()) > 0
  assert float(jnp.abs(stats['conv_head']['bn']['mean'][...]).max()) > 0


def test_gradient_step():
  cfg = micro('internimage', **VARIANT, **ONE_LEVEL, drop_path_rate=0.2)
  _, stats, grads = train_step_grads('internimage', cfg, remat=False)
  check_gradients('internimage', stats, grads)


@pytest.mark.slow
def test_remat_computes_the_same_gradients():
  """`remat=True` (nnx.remat per block, the same code in both models) changes memory, not values. On the
  FlashInternImage model, whose backward compiles fastest, which also checks its gradients."""
  cfg = micro('flash', **VARIANT, **ONE_LEVEL, drop_path_rate=0.2)
  value, stats, grads = train_step_grads('flash', cfg, remat=False)
  check_gradients('flash', stats, grads)
  value_r, _, grads_r = train_step_grads('flash', cfg, remat=True)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads)


def test_sampling_policy_reaches_every_dcn_layer():
  model = nnx.eval_shape(lambda: FlashInternImage('micro', chunk_size=64, deterministic_gradients=True, rngs=nnx.Rngs(0)))
  policies = {block.dcn.policy for level in model.levels for block in level.blocks}
  reference = DCNv4(16, groups=1, chunk_size=64, deterministic_gradients=True, rngs=nnx.Rngs(0)).policy
  assert policies == {reference}
  with pytest.raises(ValueError, match='chunk_size'):
    nnx.eval_shape(lambda: InternImage('micro', chunk_size=-1, rngs=nnx.Rngs(0)))


def test_train_with_drop_path_needs_rngs():
  model = nnx.eval_shape(lambda: InternImage('micro', drop_path_rate=0.1, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="needs rngs with a 'dropout'"):
    model(image(), train=True)


def test_parameter_counts_of_the_official_sizes():
  """T / S / B built abstractly have the reference models' parameter counts (torch `numel` over
  `parameters()`, BatchNorm running statistics excluded)."""
  want = {InternImage: (29_918_424, 50_079_880, 97_461_832), FlashInternImage: (29_815_528, 50_067_496, 97_448_960)}
  with cheap_abstract_builds():
    got = {cls: tuple(param_count(nnx.eval_shape(lambda cls=cls, p=p: cls(p, rngs=nnx.Rngs(0)))) for p in 'tsb')
           for cls in want}
  assert got == want


@pytest.mark.parametrize('kind', MODELS)
def test_state_dict_round_trip(kind):
  _, load = MODELS[kind]
  model = build(kind, micro(kind, **VARIANT), num_classes=6)
  sd = convert.to_internimage_state_dict(model)
  back = load(sd, micro(kind, **VARIANT))
  assert back.num_classes == 6
  sd_back = convert.to_internimage_state_dict(back)
  assert sd_back.keys() == sd.keys()
  for key in sd:  # every value, hence the computation: the same parameters in the same modules
    np.testing.assert_array_equal(sd_back[key], sd[key], err_msg=key)


def test_converter_names_missing_unknown_and_misshapen_keys():
  sd = convert.to_internimage_state_dict(build('internimage', 'micro', num_classes=6))
  bad = dict(sd)
  del bad['levels.1.blocks.0.dcn.offset.weight']
  bad['levels.1.blocks.0.gamma1'] = np.ones(32, np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['levels.1.blocks.0.dcn.offset.weight'\]; "
                                       r"unknown keys \['levels.1.blocks.0.gamma1'\]"):
    convert.from_internimage(bad, 'micro')
  bad = dict(sd, **{'levels.2.blocks.0.mlp.fc1.weight': np.zeros((64, 256), np.float32)})
  with pytest.raises(ValueError, match=r"'levels.2.blocks.0.mlp.fc1.weight' has shape \(64, 256\), expected "
                                       r'\(256, 64\)'):
    convert.from_internimage(bad, 'micro')
  with pytest.raises(ValueError, match=r"missing keys \['levels.0.blocks.0.dcn.offset_mask.bias', .*"
                                       r"unknown keys \['levels.0.blocks.0.dcn.dw_conv.0.bias', "):
    convert.from_flash_internimage(sd, 'micro')  # an InternImage checkpoint is not a FlashInternImage one
  sd.pop('conv_head.1.0.num_batches_tracked')  # optional: flax's BatchNorm has no counter
  assert convert.from_internimage(sd, 'micro').num_classes == 6


@pytest.mark.parametrize('kind', MODELS)
def test_export_for_gpu_and_tpu_with_a_symbolic_batch(kind):
  f, state = forward(nnx.eval_shape(lambda: MODELS[kind][0]('micro', num_classes=3, rngs=nnx.Rngs(0))))
  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  exported = jax.export.export(f, platforms=['cuda', 'tpu'])(state, spec)
  assert exported.platforms == ('cuda', 'tpu')
  assert str(exported.out_avals[0].shape) == '(b, 3)'


# ------------------------------------------------------------------------------------------------- slow tier


def _source(var: str) -> Path:
  path = os.environ.get(var)
  if not path:
    pytest.skip(f'{var} is not set (a checkout of the reference repository)')
  return Path(path)


def _load_file(name: str, path: Path, monkeypatch) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, name, module)
  spec.loader.exec_module(module)
  return module


def upstream_internimage(monkeypatch):
  """The reference `InternImage` class, its compiled-extension imports stubbed."""
  pytest.importorskip('torch', exc_type=ImportError)
  pytest.importorskip('timm')
  src = _source('DEFORMJAX_INTERNIMAGE_SRC')
  monkeypatch.syspath_prepend(str(src))  # before the pkg_resources stub: syspath_prepend consults pkg_resources
  monkeypatch.setitem(sys.modules, 'DCNv3', types.ModuleType('DCNv3'))
  probe = types.ModuleType('pkg_resources')
  probe.get_distribution = lambda name: types.SimpleNamespace(version='1.0')
  probe.fixup_namespace_packages = lambda *args: None
  monkeypatch.setitem(sys.modules, 'pkg_resources', probe)
  for name in [n for n in sys.modules if n == 'ops_dcnv3' or n.startswith('ops_dcnv3.')]:
    monkeypatch.delitem(sys.modules, name)
  return _load_file('_upstream_intern_image', src / 'models' / 'intern_image.py', monkeypatch).InternImage


def upstream_flash_internimage(monkeypatch):
  """The reference `FlashInternImage` class over the reference `DCNv4` module with `dcnv4_core_torch` as its op."""
  pytest.importorskip('torch', exc_type=ImportError)
  pytest.importorskip('timm')
  src = _source('DEFORMJAX_DCNV4_SRC')
  from references.torch_reference import dcnv4_package

  stubs = dcnv4_package()
  for name, module in stubs.items():
    monkeypatch.setitem(sys.modules, name, module)
  dcnv4 = _load_file('DCNv4.modules.dcnv4', src / 'DCNv4_op' / 'DCNv4' / 'modules' / 'dcnv4.py', monkeypatch)
  stubs['DCNv4'].DCNv4 = dcnv4.DCNv4
  path = src / 'classification' / 'models' / 'flash_intern_image.py'
  return _load_file('_upstream_flash_intern_image', path, monkeypatch).FlashInternImage


def torch_kwargs(cfg, num_classes):
  kw = dict(channels=cfg.channels, depths=list(cfg.depths), groups=list(cfg.groups), num_classes=num_classes,
            mlp_ratio=cfg.mlp_ratio, offset_scale=cfg.offset_scale, layer_scale=cfg.layer_scale,
            post_norm=cfg.post_norm, drop_path_rate=0.0)
  if cfg.dw_kernel_size is not None:
    kw['dw_kernel_size'] = cfg.dw_kernel_size
  return kw


def perturbed(torch_model, seed=0, scale=0.2):
  """Every parameter and BatchNorm statistic moved off its initialisation (the offset heads start at zero,
  the layer scale at 1e-5: tested there, they would test nothing)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
      p.copy_(noise.abs() + 0.5 if name.endswith('running_var') else p + noise)
  return torch_model.eval()


def compare(torch_model, ours, dtype, size=32):
  """Logits and input gradients of the reference (NCHW) and ours (NHWC) on one random image batch."""
  import torch
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(dtype)
  xt = torch.from_numpy(x).requires_grad_(True)
  logits_t = torch_model(xt)
  weights = np.random.default_rng(1).normal(size=logits_t.shape).astype(dtype)
  (logits_t * torch.from_numpy(weights)).sum().backward()
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

  f, state = forward(ours)
  logits, vjp = jax.vjp(lambda x: f(state, x), x_nhwc)
  grad, = vjp(jnp.asarray(weights, logits.dtype))
  ref_logits, ref_grad = logits_t.detach().numpy(), xt.grad.numpy().transpose(0, 2, 3, 1)
  err = float(np.abs(np.asarray(logits) - ref_logits).max() / np.abs(ref_logits).max())
  gerr = float(np.abs(np.asarray(grad) - ref_grad).max() / np.abs(ref_grad).max())
  return err, gerr


def _parity(kind, torch_cls, monkeypatch, dtype, cfg, float64_grids=False):
  import torch
  cls, load = MODELS[kind]
  extra = {'core_op': 'DCNv3_pytorch'} if kind == 'internimage' else {}
  torch.manual_seed(0)
  torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
  model_t = perturbed(torch_cls(**torch_kwargs(cfg, 10), **extra).to(torch_dtype))
  if float64_grids:  # the reference core builds its grids in float32 whatever the input dtype
    linspace = torch.linspace
    monkeypatch.setattr(torch, 'linspace', lambda *a, **k: linspace(*a, **dict(k, dtype=torch_dtype)))
  sd = {k: v.detach().numpy() for k, v in model_t.state_dict().items()}
  # flax's LayerNorm statistics promote their dtype with float32, which strict promotion refuses for float64.
  with jax.numpy_dtype_promotion('standard' if dtype == np.float64 else 'strict'):
    ours = load(sd, cfg, param_dtype=dtype, dtype=dtype, precision='highest')
    return compare(model_t, ours, dtype)


PARITY_CONFIGS = {'t-like': {}, 's/b-like': VARIANT}


@pytest.mark.slow
@pytest.mark.parametrize('variant', PARITY_CONFIGS)
@pytest.mark.parametrize('kind,upstream', [('internimage', upstream_internimage),
                                           ('flash', upstream_flash_internimage)], ids=['internimage', 'flash'])
def test_parity_with_the_reference_model(kind, upstream, variant, monkeypatch):
  """Logits and input gradients against the reference model, perturbed weights, float32 and float64."""
  cfg = micro(kind, **PARITY_CONFIGS[variant])
  if kind == 'internimage':
    cfg = dataclasses.replace(cfg, dw_kernel_size=None)  # InternImage-T/S/B: the offset branch's dw conv is 3x3
  torch_cls = upstream(monkeypatch)
  err, gerr = _parity(kind, torch_cls, monkeypatch, np.float32, cfg)
  print(f'{kind} {variant} float32: logits {err:.1e}, input gradient {gerr:.1e}')
  assert err < 1e-4 and gerr < 1e-4, (err, gerr)
  err, gerr = _parity(kind, torch_cls, monkeypatch, np.float64, cfg, float64_grids=True)
  print(f'{kind} {variant} float64: logits {err:.1e}, input gradient {gerr:.1e}')
  assert err < 1e-9 and gerr < 1e-9, (err, gerr)


@pytest.mark.slow
def test_reference_float32_grids_limit_float64_agreement(monkeypatch):
  """Unpatched, InternImage's pure-PyTorch core builds its reference grid in float32 even for float64 inputs:
  agreement stops near float32 rounding of the normalised grid (here ~1e-7), not at float64's."""
  err, gerr = _parity('internimage', upstream_internimage(monkeypatch), monkeypatch, np.float64, micro('internimage'))
  print(f'internimage float64, float32 reference grids: logits {err:.1e}, input gradient {gerr:.1e}')
  assert err < 1e-5 and gerr < 1e-5, (err, gerr)


@pytest.mark.slow
def test_reference_state_dict_keys_match(monkeypatch):
  """The reference models' `state_dict` keys and shapes at T size are exactly what the converters expect."""
  for kind, upstream in (('internimage', upstream_internimage), ('flash', upstream_flash_internimage)):
    cls, _ = MODELS[kind]
    cfg = cls.presets['t']
    extra = {'core_op': 'DCNv3_pytorch'} if kind == 'internimage' else {}
    model_t = upstream(monkeypatch)(**torch_kwargs(cfg, 1000), **extra)
    theirs = {k: tuple(v.shape) for k, v in model_t.state_dict().items()}
    with cheap_abstract_builds():
      ours = nnx.eval_shape(lambda cls=cls: cls('t', rngs=nnx.Rngs(0)))
    mine = {}
    for key, var, layout in convert.state_entries(ours):
      shape = var.shape
      mine[key] = (shape[1], shape[0]) if layout == 'linear' else (
          (shape[3], shape[2], shape[0], shape[1]) if layout == 'conv' else tuple(shape))
    mine['conv_head.1.0.num_batches_tracked'] = ()
    assert mine == theirs
    assert sum(int(np.prod(p.shape)) for p in model_t.parameters()) == param_count(ours)
