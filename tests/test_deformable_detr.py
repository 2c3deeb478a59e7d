"""DeformableDetr at a tiny config: shapes under jit, gradients, box refinement and two stages, the config checks,
the converter's key handling (old and new transformers names, shared heads, missing / unknown / misshapen entries)
and its round trip, and export lowering for GPU / TPU with a symbolic batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from deformjax.convert._state import to_torch
from deformjax.convert.deformable_detr import (
  _detector_entries,
  _tied_keys,
  from_deformable_detr,
  to_deformable_detr_state_dict,
)
from deformjax.models import DeformableDetr, ResNet
from deformjax.models.deformable_detr import backbone_spec, encoder_proposals, inverse_sigmoid

# A transformers-style ResNet (basic blocks, one per stage) at 8..64 channels, 2 + 2 layers, 5 queries.
BACKBONE = dict(model_type='resnet', embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                layer_type='basic', out_features=['stage2', 'stage3', 'stage4'])
TINY = dict(backbone_config=BACKBONE, d_model=32, encoder_layers=1, decoder_layers=2, num_queries=5,
            encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_n_points=1, decoder_n_points=2, num_feature_levels=4, id2label={0: 'a', 1: 'b', 2: 'c'})
TWO_STAGE = dict(TINY, with_box_refine=True, two_stage=True, two_stage_num_proposals=6)
IMAGE = (40, 36)


def images(n=2, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((n,) + IMAGE, bool)
  mask[-1, 29:] = False
  mask[-1, :, 20:] = False
  return jnp.asarray(rng.normal(size=(n,) + IMAGE + (3,)), jnp.float32), jnp.asarray(mask)


RUN = nnx.jit(lambda m, x, p: m(x, p))


def random_state(config, seed=0):
  """A transformers-named state dict for `config`, every entry random (running variances positive), shared heads
  under every name: built from the key table of an abstract detector, so no initialiser runs."""
  abstract = nnx.eval_shape(lambda: DeformableDetr(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = {}
  for key, variable, layout in _detector_entries(abstract):
    value = 0.2 * rng.normal(size=to_torch(tuple(variable.shape), layout))
    if key.endswith(('running_var', 'norm.weight', 'normalization.weight', '.1.weight', 'bn1.weight')):
      value = np.abs(value) + 0.5
    state[key] = value.astype(np.float32)
  return state | {copy: state[key] for copy, key in _tied_keys(abstract).items()}


@pytest.fixture(scope='module')
def plain():
  return from_deformable_detr(random_state(TINY), TINY)


@pytest.fixture(scope='module')
def two_stage():
  return from_deformable_detr(random_state(TWO_STAGE, 1), TWO_STAGE)


def test_plain_shapes_under_jit_and_auxiliary_outputs(plain):
  x, mask = images()
  out = RUN(plain, x, mask)
  assert out.logits.shape == (2, 5, 3) and out.pred_boxes.shape == (2, 5, 4)
  assert len(out.auxiliary_outputs) == 1 and out.auxiliary_outputs[0]['logits'].shape == (2, 5, 3)
  assert out.init_reference_points.shape == (2, 5, 2)
  assert out.intermediate_hidden_states.shape == (2, 2, 5, 32)
  assert out.intermediate_reference_points.shape == (2, 2, 5, 2)
  assert out.enc_outputs_class is None and out.enc_outputs_coord_logits is None
  boxes = np.asarray(out.pred_boxes)
  assert np.all((boxes >= 0) & (boxes <= 1))
  # Without box refinement every layer shares one pair of heads: the last layer's logits are the head on its output.
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(plain.class_embed[0](out.last_hidden_state)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.intermediate_hidden_states[:, -1]), np.asarray(out.last_hidden_state))


@pytest.mark.slow
def test_two_stage_with_box_refinement(two_stage):
  x, mask = images()
  out = RUN(two_stage, x, mask)
  tokens = sum(h * w for h, w in ((5, 5), (3, 3), (2, 2), (1, 1)))
  assert out.logits.shape == (2, 6, 3) and out.init_reference_points.shape == (2, 6, 4)
  assert out.enc_outputs_class.shape == (2, tokens, 3) and out.enc_outputs_coord_logits.shape == (2, tokens, 4)
  assert out.intermediate_reference_points.shape == (2, 2, 6, 4)
  assert len(two_stage.class_embed) == 3 and len(two_stage.bbox_embed) == 3
  # The queries are the top-scoring proposals: their reference boxes are those proposals' boxes.
  top = jax.lax.top_k(out.enc_outputs_class[..., 0], 6)[1]
  picked = jnp.take_along_axis(out.enc_outputs_coord_logits, top[..., None], axis=1)
  np.testing.assert_allclose(np.asarray(out.init_reference_points), np.asarray(jax.nn.sigmoid(picked)), rtol=1e-6)
  # The padded image's padded pixels propose nothing (logits inf).
  mask = jnp.ones((1, tokens), bool).at[0, -1].set(False)
  proposals, valid = encoder_proposals(mask, ((5, 5), (3, 3), (2, 2), (1, 1)), jnp.float32)
  assert not bool(valid[0, -1, 0]) and np.isinf(np.asarray(proposals[0, -1])).all()
  # A real pixel's proposal: its centre over the valid size, 0.05 * 2**level wide, as logits.
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(proposals[0, 0])), [0.1, 0.1, 0.05, 0.05], rtol=1e-6)


@pytest.mark.slow
def test_gradient_reaches_parameters_not_frozen_statistics(plain):
  x, mask = images()

  def loss(m):
    out = m(x, mask)
    return jnp.sum(jax.nn.sigmoid(out.logits)) + jnp.sum(out.pred_boxes)

  grads = nnx.jit(nnx.grad(loss))(plain)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert np.abs(np.asarray(grads.backbone.stem_conv.kernel[...])).max() > 0
  assert not jax.tree.leaves(nnx.state(grads, nnx.BatchStat))  # frozen batch norm: no gradient
  assert len(jax.tree.leaves(nnx.state(plain, nnx.BatchStat))) == 4 * (1 + 4 * 2 + 3)


def test_inverse_sigmoid_clamps_as_transformers():
  x = jnp.asarray([-1.0, 0.0, 0.25, 1.0, 2.0])
  want = np.log(np.maximum(np.clip(x, 0, 1), 1e-5) / np.maximum(1 - np.clip(x, 0, 1), 1e-5))
  np.testing.assert_allclose(np.asarray(inverse_sigmoid(x)), want, rtol=1e-6)


def test_config_values_refused_by_name():
  for bad, message in (
      (dict(position_embedding_type='learned'), "config\\['position_embedding_type'\\] must be 'sine'"),
      (dict(two_stage=True), "two_stage'\\]=True needs config\\['with_box_refine'\\]=True"),
      (dict(dilation=True), 'dilation'),
      (dict(activation_function='tanh'), "config\\['activation_function'\\] must be one of"),
      (dict(backbone_config=dict(BACKBONE, model_type='swin')), "model_type'\\] must be 'timm_backbone' or 'resnet'"),
      (dict(backbone_config=None, backbone='resnet7'), "config\\['backbone'\\] must be one of timm's"),
      (dict(d_model=0), "config\\['d_model'\\] must be a positive int"),
      (dict(with_box_refine=True, tie_word_embeddings=False), "tie_word_embeddings'\\]=False with config\\['with_box_r")):
    with pytest.raises(ValueError, match=f'DeformableDetr: .*{message}'):
      nnx.eval_shape(lambda bad=bad: DeformableDetr(dict(TINY, **bad), rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match='config must be a dict'):
    DeformableDetr([1], rngs=nnx.Rngs(0))
  too_many = nnx.eval_shape(lambda: DeformableDetr(dict(TWO_STAGE, two_stage_num_proposals=40), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="two_stage_num_proposals'\\]=40 exceeds the encoder's 39 tokens"):
    nnx.eval_shape(lambda m, x, p: m(x, p), too_many, *images())


# transformers' own count of the distinct parameters of `DeformableDetrForObjectDetection` at these configs (5.25,
# `sum(p.numel() for p in model.parameters())`, tied heads counted once; checked against transformers in
# test_detection_slow.py); the heads are 99 (class) and 2244 (box) each.
PARAMETER_COUNTS = {'plain': 125321, 'box_refine': 127565, 'two_stage': 135029, 'untied': 127664}
HEAD_CONFIGS = {'plain': TINY, 'box_refine': dict(TINY, with_box_refine=True), 'two_stage': TWO_STAGE,
                'untied': dict(TINY, tie_word_embeddings=False)}


def _count(detector):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(detector, nnx.Param)))


@pytest.mark.parametrize('name', list(HEAD_CONFIGS))
def test_heads_are_shared_where_transformers_ties_them(name):
  """One module where transformers ties heads (so one parameter and one gradient): without box refinement both heads,
  with it the class head alone, with two stages none; `tie_word_embeddings=False` none."""
  detector = nnx.eval_shape(lambda: DeformableDetr(HEAD_CONFIGS[name], rngs=nnx.Rngs(0)))
  layers = 3 if name == 'two_stage' else 2
  assert len(detector.class_embed) == len(detector.bbox_embed) == layers
  shared_class = name in ('plain', 'box_refine')
  assert (detector.class_embed[0] is detector.class_embed[1]) == shared_class
  assert (detector.bbox_embed[0] is detector.bbox_embed[1]) == (name == 'plain')
  assert _count(detector) == PARAMETER_COUNTS[name]
  detector.untie_heads()
  assert len({id(h) for h in [*detector.class_embed, *detector.bbox_embed]}) == 2 * layers
  assert _count(detector) == PARAMETER_COUNTS[name] + 99 * shared_class + 2244 * (name == 'plain')
  with pytest.raises(ValueError, match="untie_heads: names must be 'class_embed' or 'bbox_embed', got 'heads'"):
    detector.untie_heads('heads')


def test_per_layer_heads_that_differ_load_apart_and_round_trip():
  """A box-refinement state dict with a class head per layer (the official checkpoints'): the detector keeps them
  apart, as transformers' loader does, and writes them back."""
  refine = dict(TINY, with_box_refine=True)
  state = random_state(refine)
  state['class_embed.1.weight'] = state['class_embed.1.weight'] + 1
  detector = from_deformable_detr(state, refine)
  assert detector.class_embed[0] is not detector.class_embed[1]
  assert _count(detector) == PARAMETER_COUNTS['box_refine'] + 99
  back = to_deformable_detr_state_dict(detector)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_backbone_specs_of_old_and_new_configs():
  assert backbone_spec({'backbone': 'resnet50'}).widths == (256, 512, 1024, 2048)  # older: use_timm_backbone
  v5 = {'backbone_config': {'model_type': 'timm_backbone', 'backbone': 'resnet18', 'out_indices': [2, 3, 4]}}
  assert backbone_spec(v5)[:2] == ('timm', 'basic') and backbone_spec(v5).out_indices == (2, 3, 4)
  assert backbone_spec({'num_feature_levels': 1}).out_indices == (4,)
  spec = backbone_spec({'backbone_config': BACKBONE})
  assert spec.layout == 'transformers' and spec.out_indices == (2, 3, 4) and spec.stem_features == 8


def test_resnet_strides_and_widths():
  net = nnx.eval_shape(lambda: ResNet((1, 1, 1, 1), (16, 32, 64, 128), block='bottleneck', stem_features=8,
                                      out_indices=(1, 2, 3, 4), rngs=nnx.Rngs(0)))
  maps = nnx.eval_shape(lambda m, x: m(x), net, jnp.ones((1, 64, 64, 3), jnp.float32))
  assert [m.shape for m in maps] == [(1, 16, 16, 16), (1, 8, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128)]
  with pytest.raises(ValueError, match='out_indices must be increasing stages among 1..4'):
    ResNet((1, 1, 1, 1), (8, 8, 8, 8), out_indices=(0, 2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'x must have shape \[N, H, W, 3\]'):
    net(jnp.ones((1, 3, 64, 64), jnp.float32))


def _assert_same_parameters(a, b):
  for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param, nnx.BatchStat)),
                  jax.tree.leaves(nnx.state(b, nnx.Param, nnx.BatchStat))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('config', ['plain', 'two_stage'])
def test_state_dict_round_trip(config, plain, two_stage):
  detector, cfg = (plain, TINY) if config == 'plain' else (two_stage, TWO_STAGE)
  state = to_deformable_detr_state_dict(detector)
  assert 'model.backbone.model.embedder.embedder.convolution.weight' in state
  if config == 'plain':
    np.testing.assert_array_equal(state['class_embed.1.weight'], state['class_embed.0.weight'])  # shared heads
    assert 'model.query_position_embeddings.weight' in state and 'model.decoder.bbox_embed.0.layers.0.weight' not in state
  else:
    assert 'model.decoder.class_embed.2.bias' in state and 'model.enc_output.weight' in state
  ported = from_deformable_detr(state, cfg)
  _assert_same_parameters(ported, detector)
  # Shared heads listed once (a file saved with shared tensors removed) load the same.
  once = {k: v for k, v in state.items() if k not in _tied_keys(detector)}
  assert len(once) < len(state)
  _assert_same_parameters(from_deformable_detr(once, cfg), detector)


def test_older_transformers_names_and_refusals(plain):
  state = to_deformable_detr_state_dict(plain)
  old = {}
  for key, value in state.items():
    key = key.replace('model.backbone.model.', 'model.backbone.conv_encoder.model.').replace('.mlp.fc', '.fc')
    old[key.replace('self_attn.o_proj', 'self_attn.out_proj')] = value
  old['model.backbone.conv_encoder.model.embedder.embedder.normalization.num_batches_tracked'] = np.zeros(())
  assert 'model.encoder.layers.0.fc1.weight' in old and 'model.decoder.layers.0.self_attn.out_proj.bias' in old
  _assert_same_parameters(from_deformable_detr(old, TINY), plain)
  fn = 'from_deformable_detr'
  missing = {k: v for k, v in state.items() if k != 'model.decoder.layers.1.mlp.fc2.bias'}
  with pytest.raises(ValueError, match=f"{fn}: state has no 'model.decoder.layers.1.mlp.fc2.bias'"):
    from_deformable_detr(missing, TINY)
  with pytest.raises(ValueError, match=rf"{fn}: state entries the detector has no parameter for: \['model.extra'\]"):
    from_deformable_detr(state | {'model.extra': np.zeros(1)}, TINY)
  with pytest.raises(ValueError, match=rf"{fn}: 'model.level_embed' must have shape \(4, 32\), got \(3, 32\)"):
    from_deformable_detr(state | {'model.level_embed': np.zeros((3, 32))}, TINY)
  refine = dict(TINY, with_box_refine=True)
  refine_state = random_state(refine)
  with pytest.raises(ValueError, match=f"{fn}: 'model.decoder.bbox_embed.1.layers.2.bias' must equal "
                                       "'bbox_embed.1.layers.2.bias'"):
    copy = refine_state['model.decoder.bbox_embed.1.layers.2.bias'] + 1
    from_deformable_detr(refine_state | {'model.decoder.bbox_embed.1.layers.2.bias': copy}, refine)
  with pytest.raises(ValueError, match=f'{fn}: state holds .* under two names'):
    from_deformable_detr(state | {'model.encoder.layers.0.fc1.weight': np.zeros(1)}, TINY)
  with pytest.raises(ValueError, match=f'{fn}: state entries the detector has no parameter for'):
    from_deformable_detr(state, dict(TINY, with_box_refine=True) | {'decoder_layers': 1})


def test_export_lowers_for_gpu_and_tpu_with_a_symbolic_batch(plain):
  (b,) = export.symbolic_shape('b')
  graphdef, state = nnx.split(plain)

  def apply(state, x, mask):
    out = nnx.merge(graphdef, state)(x, mask)
    return out.logits, out.pred_boxes

  exp = export.export(jax.jit(apply), platforms=['cuda', 'tpu'])(
      state, jax.ShapeDtypeStruct((b,) + IMAGE + (3,), jnp.float32), jax.ShapeDtypeStruct((b,) + IMAGE, jnp.bool_))
  assert exp.platforms == ('cuda', 'tpu')
  assert [str(a.shape) for a in exp.out_avals] == ['(b, 5, 3)', '(b, 5, 4)']


def test_stem_max_pool_is_pytorchs():
  """MaxPool2d(3, stride=2, padding=1) as nine strided slices: the reduce-window max pool's values, odd and even."""
  from deformjax.models.resnet import _max_pool_3x3
  for shape in ((2, 7, 8, 3), (1, 6, 5, 2)):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    want = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.asarray(_max_pool_3x3(x)), np.asarray(want))


def test_internimage_pyramid_as_the_backbone():
  from deformjax.models import InternImage, PyramidBackbone
  net = nnx.eval_shape(lambda: InternImage('micro', num_classes=0, rngs=nnx.Rngs(0)))
  backbone = PyramidBackbone(net, (1, 2, 3))
  detector = nnx.eval_shape(lambda: DeformableDetr(TINY, backbone=backbone, deterministic=True, rngs=nnx.Rngs(0)))
  assert detector.encoder.in_features == (32, 64, 128) and detector.backbone_layout is None
  out = nnx.eval_shape(lambda m, x, p: m(x, p), detector, *images())
  assert out.logits.shape == (2, 5, 3) and out.pred_boxes.shape == (2, 5, 4)
  with pytest.raises(TypeError, match='PyramidBackbone: model must have pyramid'):
    PyramidBackbone(object())
