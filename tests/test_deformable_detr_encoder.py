"""DeformableDetrEncoder: shapes under jit, the padding mask, reference points and valid ratios against their
formulas, gradients, export, the attention's execution policy, the converter's key handling, and (slow)
transformers' DeformableDetrModel itself."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from deformjax.convert import deformable_detr as convert
from deformjax.models.deformable_detr import (
  DeformableDetrEncoder,
  DeformableDetrEncoderLayer,
  downsample_mask,
  reference_points,
  valid_ratios,
)
from deformjax.nn import _common
from tests.test_module_policy import count

# Two backbone maps and one extra stride-2 level; GroupNorm(32) of a 64-wide model puts 2 channels in a group.
TINY = dict(d_model=64, num_heads=4, num_levels=3, num_points=2, num_layers=2, ffn_features=32)
BACKBONE = (6, 10)
FEATURE_SHAPES = ((9, 7), (5, 4))
IMAGE = (37, 29)


def build(dtype=jnp.float32, seed=0, **kw):
  cfg = dict(TINY, **kw)
  d = cfg.pop('d_model')
  return DeformableDetrEncoder(BACKBONE, d, deterministic=True, param_dtype=dtype, rngs=nnx.Rngs(seed), **cfg)


def features(n=2, dtype=np.float32, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(n, h, w, c)).astype(dtype) for (h, w), c in zip(FEATURE_SHAPES, BACKBONE)]


def pixel_mask(n=2, valid=((37, 29), (25, 17))):
  """Bottom / right padding, as DETR's batching pads images."""
  mask = np.zeros((n,) + IMAGE, bool)
  for i, (h, w) in enumerate(valid[:n]):
    mask[i, :h, :w] = True
  return mask


def random_state(seed=3, layers=1, d=64, heads=4, levels=3, points=2, ffn=32, backbone=BACKBONE):
  """A transformers-named encoder state, every entry random (zero heads and unit norms would test nothing)."""
  rng = np.random.default_rng(seed)
  shapes = {'level_embed': (levels, d)}
  for level in range(levels):
    cin, k = (backbone[level], 1) if level < len(backbone) else (backbone[-1] if level == len(backbone) else d, 3)
    shapes |= {f'input_proj.{level}.0.weight': (d, cin, k, k), f'input_proj.{level}.0.bias': (d,),
               f'input_proj.{level}.1.weight': (d,), f'input_proj.{level}.1.bias': (d,)}
  samples = heads * levels * points
  for j in range(layers):
    h = f'encoder.layers.{j}.'
    for key, out, inp in (('self_attn.sampling_offsets', samples * 2, d), ('self_attn.attention_weights', samples, d),
                          ('self_attn.value_proj', d, d), ('self_attn.output_proj', d, d), ('mlp.fc1', ffn, d),
                          ('mlp.fc2', d, ffn)):
      shapes |= {f'{h}{key}.weight': (out, inp), f'{h}{key}.bias': (out,)}
    for key in ('self_attn_layer_norm', 'final_layer_norm'):
      shapes |= {f'{h}{key}.weight': (d,), f'{h}{key}.bias': (d,)}
  state = {k: (0.3 * rng.normal(size=v)).astype(np.float32) for k, v in shapes.items()}
  for k in state:
    if k.endswith('norm.weight') or k.endswith('.1.weight'):
      state[k] += 1
  return state


@pytest.fixture(scope='module')
def encoder():
  return convert.from_deformable_detr_encoder(random_state(), num_heads=4, num_points=2)


# One jitted function for every test: the encoder compiles once per input structure.
RUN = nnx.jit(lambda m, f, p: m(f, p))


def test_shapes_under_jit_and_what_the_decoder_reads(encoder):
  out = RUN(encoder, features(), pixel_mask())
  shapes = FEATURE_SHAPES + ((3, 2),)
  total = sum(h * w for h, w in shapes)
  assert out.spatial_shapes == shapes and out.level_start_index == (0, 63, 83)
  assert out.last_hidden_state.shape == (2, total, 64) and out.last_hidden_state.dtype == jnp.float32
  assert out.mask_flatten.shape == (2, total) and out.mask_flatten.dtype == jnp.bool_
  assert out.valid_ratios.shape == (2, 3, 2)
  assert np.all(np.isfinite(np.asarray(out.last_hidden_state)))
  masks = [np.asarray(downsample_mask(jnp.asarray(pixel_mask()), s)).reshape(2, -1) for s in shapes]
  np.testing.assert_array_equal(np.asarray(out.mask_flatten), np.concatenate(masks, 1))


@pytest.mark.slow
def test_no_mask_equals_an_all_true_mask(encoder):
  feats = features()
  np.testing.assert_array_equal(np.asarray(RUN(encoder, feats, np.ones((2,) + IMAGE, bool)).last_hidden_state),
                                np.asarray(RUN(encoder, feats, None).last_hidden_state))


def test_padded_pixels_do_not_reach_valid_outputs(encoder):
  """The layer stack reads values only where the mask is real (the input projection's GroupNorm and the stride-2
  conv do see padding, in transformers as here: the property holds from the flattened inputs on)."""
  n, d = 2, 64
  shapes = FEATURE_SHAPES + ((3, 2),)
  masks = [np.asarray(downsample_mask(jnp.asarray(pixel_mask()), s)) for s in shapes]
  mask_flat = np.concatenate([m.reshape(n, -1) for m in masks], 1)
  ratios = jnp.stack([valid_ratios(jnp.asarray(m)) for m in masks], 1)
  rng = np.random.default_rng(4)
  x, pos = (rng.normal(size=(n, mask_flat.shape[1], d)).astype(np.float32) for _ in range(2))
  noise = np.where(mask_flat[..., None], 0, rng.normal(size=x.shape) * 10).astype(np.float32)
  run = nnx.jit(lambda m, x, pos: m.encode(x, pos, shapes, ratios, jnp.asarray(mask_flat)))
  base, moved = np.asarray(run(encoder, x, pos)), np.asarray(run(encoder, x + noise, pos + noise))
  assert not mask_flat.all() and (moved != base)[~mask_flat].any()
  np.testing.assert_array_equal(moved[mask_flat], base[mask_flat])


def test_downsample_mask_is_pytorch_nearest():
  """Source index floor(i * in / out), the product in float32 (ATen's legacy nearest), for shrinking and growing."""
  rng = np.random.default_rng(0)
  mask = rng.uniform(size=(2, 37, 29)) > 0.5
  for size in [(9, 7), (3, 2), (74, 58), (40, 31)]:  # shrink, the 2x special case, a non-integer growth
    rows = [min(int(np.floor(np.float32(i) * np.float32(np.float32(37) / np.float32(size[0])))), 36)
            for i in range(size[0])]
    cols = [min(int(np.floor(np.float32(j) * np.float32(np.float32(29) / np.float32(size[1])))), 28)
            for j in range(size[1])]
    np.testing.assert_array_equal(np.asarray(downsample_mask(jnp.asarray(mask), size)), mask[:, rows][:, :, cols])


def test_valid_ratios_and_reference_points_match_their_formulas():
  shapes = FEATURE_SHAPES + ((3, 2),)
  masks = [np.asarray(downsample_mask(jnp.asarray(pixel_mask()), s)) for s in shapes]
  ratios = jnp.stack([valid_ratios(jnp.asarray(m), jnp.float64) for m in masks], 1)
  want_ratios = np.zeros((2, 3, 2))
  for b in range(2):
    for level, m in enumerate(masks):
      h, w = m.shape[1:]
      want_ratios[b, level] = (m[b, 0, :].sum() / w, m[b, :, 0].sum() / h)
  np.testing.assert_allclose(np.asarray(ratios), want_ratios, rtol=1e-15, atol=0)  # XLA's division: 1 ulp
  assert want_ratios[1].min() < 1  # the second image is padded
  ref = np.asarray(jax.jit(lambda r: reference_points(shapes, r))(ratios))
  want = []
  for b in range(2):
    rows = []
    for level, (h, w) in enumerate(shapes):
      rx, ry = want_ratios[b, level]
      for i in range(h):
        for j in range(w):
          x, y = (j + 0.5) / (rx * w), (i + 0.5) / (ry * h)
          rows.append([[x * want_ratios[b, k, 0], y * want_ratios[b, k, 1]] for k in range(3)])
    want.append(rows)
  assert ref.dtype == np.float64
  np.testing.assert_allclose(ref, np.asarray(want), rtol=1e-14, atol=0)


@pytest.mark.slow
def test_gradient_is_finite(encoder):
  feats = [jnp.asarray(f) for f in features()]
  mask = jnp.asarray(pixel_mask())

  def loss(m, f):
    return jnp.sum(jnp.tanh(m(f, mask).last_hidden_state))

  grad_m, grad_f = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(encoder, feats)
  leaves = jax.tree.leaves(nnx.state(grad_m, nnx.Param)) + list(grad_f)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert all(np.any(np.asarray(g) != 0) for g in grad_f)


def test_round_trip_through_the_transformers_state(encoder):
  state = convert.to_deformable_detr_encoder_state_dict(encoder)
  state['backbone.model.embedder.weight'] = np.zeros(3)  # other parts of the model are ignored
  state['decoder.layers.0.fc1.weight'] = np.zeros(3)
  ported = convert.from_deformable_detr_encoder(state, num_heads=4, num_points=2)
  assert ported.in_features == BACKBONE and ported.num_levels == 3 and len(ported.layers) == 1
  for a, b in zip(jax.tree.leaves(nnx.state(ported, nnx.Param)), jax.tree.leaves(nnx.state(encoder, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  prefixed = {'model.' + k: v for k, v in state.items()} | {'class_embed.0.weight': np.zeros(3)}
  again = convert.from_deformable_detr_encoder(prefixed, num_heads=4, num_points=2, prefix='model.')
  np.testing.assert_array_equal(np.asarray(again.level_embed[...]), np.asarray(encoder.level_embed[...]))


def test_converter_names_missing_unknown_and_misshapen_keys(encoder):
  state = convert.to_deformable_detr_encoder_state_dict(encoder)
  fn = 'from_deformable_detr_encoder'
  kw = dict(num_heads=4, num_points=2)
  broken = dict(state)
  del broken['encoder.layers.0.final_layer_norm.bias']
  with pytest.raises(ValueError, match=f"{fn}: state has no 'encoder.layers.0.final_layer_norm.bias'"):
    convert.from_deformable_detr_encoder(broken, **kw)
  with pytest.raises(ValueError, match=rf"{fn}: state entries the encoder has no parameter for: \['encoder.extra'\]"):
    convert.from_deformable_detr_encoder(state | {'encoder.extra': np.zeros(1)}, **kw)
  with pytest.raises(ValueError, match=r"'encoder.layers.0.self_attn_layer_norm.weight' must have shape \(64,\)"):
    convert.from_deformable_detr_encoder(state | {'encoder.layers.0.self_attn_layer_norm.weight': np.ones(3)}, **kw)
  with pytest.raises(ValueError, match=rf"{fn}: 'encoder.layers.0.self_attn.sampling_offsets.weight' "
                                       r'must have shape \(72, 64\), got \(48, 64\)'):
    convert.from_deformable_detr_encoder(state, num_heads=4, num_points=3)
  with pytest.raises(ValueError, match="pass prefix='model.'"):
    convert.from_deformable_detr_encoder({'model.' + k: v for k, v in state.items()}, **kw)
  with pytest.raises(ValueError, match='only the sine position embedding'):
    convert.from_deformable_detr_encoder(state | {'position_embedding.row_embeddings.weight': np.zeros(3)}, **kw)
  extra = len(BACKBONE)  # the first extra level, which reads the last backbone map
  misread = state | {f'input_proj.{extra}.0.weight': np.zeros((64, BACKBONE[-1] + 1, 3, 3))}
  with pytest.raises(ValueError, match=rf"{fn}: 'input_proj.{extra}.0.weight' must have shape "
                                       rf'\(64, {BACKBONE[-1]}, 3, 3\)'):
    convert.from_deformable_detr_encoder(misread, **kw)
  with pytest.raises(ValueError, match='activation_function must be one of'):
    convert.from_deformable_detr_encoder(state, activation_function='tanh', **kw)
  for policy, error, message in (
      (dict(chunk_size=0), ValueError, 'chunk_size must be a positive int or None, got 0'),
      (dict(memory_budget=True), ValueError, 'memory_budget must be a positive int or None, got True'),
      (dict(deterministic_gradients=1), TypeError, 'deterministic_gradients must be a bool, got 1')):
    with pytest.raises(error, match=f'{fn}: {message}'):
      convert.from_deformable_detr_encoder(state, **kw, **policy)


def test_value_proj_ratio_needs_value_features():
  """mmcv's value_proj_ratio=0.5: a value width of d_model/2, read from value_proj.weight."""
  d, m, lv, p = 8, 2, 1, 1
  rng = np.random.default_rng(0)
  state = {'sampling_offsets.weight': rng.normal(size=(m * lv * p * 2, d)), 'sampling_offsets.bias': np.zeros(4),
           'attention_weights.weight': rng.normal(size=(m * lv * p, d)), 'attention_weights.bias': np.zeros(2),
           'value_proj.weight': rng.normal(size=(d // 2, d)), 'value_proj.bias': np.zeros(d // 2),
           'output_proj.weight': rng.normal(size=(d, d // 2)), 'output_proj.bias': np.zeros(d)}
  import inspect

  from deformjax.nn import MSDeformAttn
  if 'value_features' not in inspect.signature(MSDeformAttn.__init__).parameters:
    with pytest.raises(ValueError, match=r"maps d_model=8 to 4 value channels \(mmcv's value_proj_ratio=0.5\); "
                                         'MSDeformAttn here has no value_features argument'):
      convert.from_deformable_detr_attention(state, num_heads=m, num_levels=lv, num_points=p)
    return
  state['sampling_offsets.weight'][...] = 0  # every head samples at its reference point
  layer = convert.from_deformable_detr_attention(state, num_heads=m, num_levels=lv, num_points=p)
  assert layer.value_proj.kernel.shape == (d, d // 2) and layer.output_proj.kernel.shape == (d // 2, d)
  x = rng.normal(size=(1, 4, d)).astype(np.float32)
  ref = np.full((1, 4, 1, 2), 0.5, np.float32)  # the centre of a 2x2 map: the mean of its four pixels
  got = nnx.jit(lambda m, x, ref: m(x, ref, x, [(2, 2)]))(layer, x, ref)
  value = x[0] @ state['value_proj.weight'].T.astype(np.float32)
  want = value.mean(0) @ state['output_proj.weight'].T.astype(np.float32)
  np.testing.assert_allclose(np.asarray(got)[0], np.broadcast_to(want, (4, d)), rtol=1e-5, atol=1e-5)


def test_export_lowers_with_a_symbolic_batch(encoder):
  (b,) = export.symbolic_shape('b')
  graphdef, state = nnx.split(encoder)
  spec = [jax.ShapeDtypeStruct((b, h, w, c), jnp.float32) for (h, w), c in zip(FEATURE_SHAPES, BACKBONE)]

  def apply(state, feats, mask):
    return nnx.merge(graphdef, state)(feats, mask).last_hidden_state

  exp = export.export(jax.jit(apply), platforms=['cuda', 'tpu'])(
      state, spec, jax.ShapeDtypeStruct((b,) + IMAGE, jnp.bool_))
  assert exp.platforms == ('cuda', 'tpu')
  assert exp.out_avals[0].shape[1:] == (83 + 6, 64) and str(exp.out_avals[0].shape[0]) == 'b'


# --- the attention's execution policy -----------------------------------------------------------------------------

# One layer at 8 channels: two levels (backbone maps, no extra level), 20 + 6 = 26 queries.
POLICY_BACKBONE = (4, 4)
POLICY_SHAPES = ((4, 5), (2, 3))
POLICY_SETTINGS = {'default': {}, 'chunks': dict(chunk_size=5), 'budget': dict(memory_budget=256),
                   'deterministic': dict(deterministic_gradients=True)}


def policy_encoder(num_layers=1, **policy):
  return DeformableDetrEncoder(POLICY_BACKBONE, 8, num_heads=2, num_levels=2, num_points=2, num_layers=num_layers,
                               ffn_features=8, num_groups=2, deterministic=True, rngs=nnx.Rngs(0), **policy)


def test_policy_keywords_reach_every_layers_attention_and_modes_leave_them_alone():
  """The encoder's `chunk_size`, `memory_budget` and `deterministic_gradients` become every layer's
  `MSDeformAttn` policy; `.train()` / `.eval()` switch dropout's `deterministic` only."""
  policy = dict(chunk_size=5, memory_budget=4096, deterministic_gradients=True)
  want = _common.SamplingPolicy(chunk_size=5, memory_budget=4096, deterministic_gradients=True)
  enc = nnx.eval_shape(lambda: policy_encoder(num_layers=2, **policy))
  assert [layer.self_attn.policy for layer in enc.layers] == [want, want]
  for mode, dropout_off in ((enc.train, False), (enc.eval, True), (enc.train, False)):
    mode()
    assert all(layer.self_attn.policy == want and layer.dropout.deterministic is dropout_off
               for layer in enc.layers)
  default = nnx.eval_shape(lambda: policy_encoder(num_layers=2))
  assert [layer.self_attn.policy for layer in default.layers] == [_common.SamplingPolicy()] * 2
  layer = nnx.eval_shape(lambda: DeformableDetrEncoderLayer(8, 2, 2, 2, 8, rngs=nnx.Rngs(0), **policy))
  assert layer.self_attn.policy == want


@pytest.mark.parametrize('cls', ['DeformableDetrEncoder', 'DeformableDetrEncoderLayer'])
def test_bad_policy_values_are_refused_by_the_encoders_names(cls):
  build = {'DeformableDetrEncoder': lambda **p: policy_encoder(**p),
           'DeformableDetrEncoderLayer': lambda **p: DeformableDetrEncoderLayer(8, 2, 2, 2, 8, rngs=nnx.Rngs(0), **p)}
  for policy, error, message in (
      (dict(chunk_size=0), ValueError, 'chunk_size must be a positive int or None'),
      (dict(memory_budget=True), ValueError, 'memory_budget must be a positive int or None'),
      (dict(deterministic_gradients=1), TypeError, 'deterministic_gradients must be a bool, got 1')):
    with pytest.raises(error, match=f'{cls}: {message}'):
      build[cls](**policy)


def test_policy_changes_how_the_ported_encoder_runs_not_what_it_computes():
  """`from_deformable_detr_encoder`'s policy keywords build the encoder with them (and so reach every layer's
  attention): forced chunks and a small memory budget give the default output; `deterministic_gradients=True`
  gives the same parameter gradients bit for bit on a second call. Each keyword visibly reaches the op (chunk
  loops, the sorted-segment-sum VJP). Every setting is ported from one random transformers-named state (random:
  the zero-initialised offset head would sample a fixed star of points), so they share parameters. The layer
  stack (`encode`) is what the policy acts on, and one compiled function computes every setting: the input
  projection would only add compile time."""
  state = random_state(d=8, heads=2, levels=2, points=2, ffn=8, backbone=POLICY_BACKBONE)
  ported = {key: convert.from_deformable_detr_encoder(state, num_heads=2, num_points=2, num_groups=2, **policy)
            for key, policy in POLICY_SETTINGS.items()}
  for key, policy in POLICY_SETTINGS.items():
    want = _common.SamplingPolicy(policy.get('chunk_size'), policy.get('memory_budget'),
                                  policy.get('deterministic_gradients', False))
    assert all(layer.self_attn.policy == want for layer in ported[key].layers), key
  rng = np.random.default_rng(5)
  x, pos = (jnp.asarray(rng.normal(size=(1, 26, 8)), jnp.float32) for _ in range(2))
  ratios = jnp.asarray(rng.uniform(0.5, 1.0, size=(1, 2, 2)), jnp.float32)
  split = {key: nnx.split(enc, nnx.Param, ...) for key, enc in ported.items()}
  _, params, _ = split['default']
  calls = {key: lambda p, x, pos, g=graphdef, rest=rest: nnx.merge(g, p, rest).encode(x, pos, POLICY_SHAPES, ratios)
           for key, (graphdef, _, rest) in split.items()}
  for key, call in calls.items():
    jaxpr = jax.make_jaxpr(call)(params, x, pos).jaxpr
    assert (count(jaxpr, 'scan') > 0) == (key in ('chunks', 'budget')), key
    assert (count(jaxpr, 'custom_vjp') > 0) == (key == 'deterministic'), key

  def everything(params, x, pos, cotangent):
    outs = {key: calls[key](params, x, pos) for key in ('default', 'chunks', 'budget')}
    outs['deterministic'], vjp = jax.vjp(lambda p: calls['deterministic'](p, x, pos), params)
    return outs, vjp(cotangent)[0]

  cotangent = jnp.asarray(rng.normal(size=(1, 26, 8)), jnp.float32)
  run = jax.jit(everything).lower(params, x, pos, cotangent).compile()
  outs, grads = run(params, x, pos, cotangent)
  _, grads_again = run(params, x, pos, cotangent)
  for key, out in outs.items():
    np.testing.assert_allclose(out, outs['default'], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, grads_again, grads)
  # Real gradients: the attention's sampling offsets get some (they reach the output through the sampler only).
  assert float(jnp.abs(grads['layers'][0]['self_attn']['sampling_offsets']['kernel'][...]).max()) > 0


# --- transformers' DeformableDetrModel (slow) ---------------------------------------------------------------------


def _detr_model(torch, dtype):
  from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

  backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, BACKBONE[0], BACKBONE[1]],
                          depths=[1, 1, 1], layer_type='basic', out_features=['stage2', 'stage3'])
  config = DeformableDetrConfig(use_timm_backbone=False, backbone=None, backbone_config=backbone,
                                use_pretrained_backbone=False, d_model=64, encoder_layers=2, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                decoder_ffn_dim=32, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2,
                                num_queries=5, disable_custom_kernels=True)
  torch.manual_seed(0)
  model = DeformableDetrModel(config).to(dtype).eval()
  gen = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.startswith('backbone.'):
        p.add_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
  return model


@pytest.fixture
def stack():
  with contextlib.ExitStack() as s:
    yield s


@pytest.mark.slow
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_matches_transformers_deformable_detr_model(masked, dtype, stack):
  """Real pixels agree, values and input gradients. Padded ones are compared through their masks only: a row or
  column of padding puts the sine embedding at arguments near 3e6 radians, where float sin itself differs between
  libraries (and between CPU and GPU), and nothing real reads them."""
  torch = pytest.importorskip('torch', exc_type=ImportError)
  pytest.importorskip('transformers', exc_type=ImportError)
  if dtype == 'float64':
    # flax's norms take their statistics in promote_types(dtype, float32), which strict promotion refuses.
    stack.enter_context(jax.numpy_dtype_promotion('standard'))
  tdtype = getattr(torch, dtype)
  model = _detr_model(torch, tdtype)
  feats = features(dtype=np.dtype(dtype), seed=2)
  maps = [torch.tensor(f.transpose(0, 3, 1, 2), requires_grad=True) for f in feats]

  class FixedMaps(torch.nn.Module):
    """Stands in for the backbone network: returns the given NCHW maps (so that gradients reach them)."""

    def forward(self, pixel_values):
      return tuple(maps)

  model.backbone.model = FixedMaps()
  mask = pixel_mask()
  torch_mask = torch.from_numpy(mask.astype(np.int64)) if masked else None
  expected = model(torch.zeros((2, 3) + IMAGE, dtype=tdtype), pixel_mask=torch_mask).encoder_last_hidden_state

  state = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.startswith('backbone.model.')}
  enc = convert.from_deformable_detr_encoder(state, num_heads=4, num_points=2, param_dtype=np.dtype(dtype))
  jmask = jnp.asarray(mask) if masked else None
  jfeats = [jnp.asarray(f) for f in feats]
  out = nnx.jit(lambda m, f, p: m(f, p))(enc, jfeats, jmask)
  real = np.asarray(out.mask_flatten)
  # transformers' masks: interpolate(pixel_mask) per level, flattened.
  levels = [torch.nn.functional.interpolate(torch.from_numpy(mask)[None].float(), size=s).bool()[0].reshape(2, -1)
            for s in out.spatial_shapes] if masked else [torch.ones(2, h * w, dtype=torch.bool)
                                                         for h, w in out.spatial_shapes]
  np.testing.assert_array_equal(real, torch.cat(levels, 1).numpy())
  assert real.all() != masked

  cot = np.random.default_rng(9).normal(size=tuple(expected.shape)) * real[..., None]
  want_grads = torch.autograd.grad((expected * torch.from_numpy(cot).to(tdtype)).sum(), maps)

  def loss(f):
    return jnp.sum(enc(f, jmask).last_hidden_state * jnp.asarray(cot, dtype))

  grads = jax.jit(jax.grad(loss))(jfeats)
  tol = 1e-4 if dtype == 'float32' else 1e-9
  got, want = np.asarray(out.last_hidden_state)[real], expected.detach().numpy()[real]
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'{dtype} masked={masked}: max |ours - transformers| / max |transformers| = {err:.2e}')
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
  for g, w in zip(grads, want_grads):
    w = w.detach().numpy().transpose(0, 2, 3, 1)
    gerr = np.abs(np.asarray(g) - w).max() / np.abs(w).max()
    print(f'  grad {w.shape}: max |ours - transformers| / max |transformers| = {gerr:.2e}')
    np.testing.assert_allclose(np.asarray(g), w, rtol=tol, atol=tol * np.abs(w).max())
