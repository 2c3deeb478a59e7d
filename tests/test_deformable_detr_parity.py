"""DeformableDetr against transformers' DeformableDetrForObjectDetection itself (slow; skipped without torch,
transformers or timm): random weights with every parameter and batch-norm statistic perturbed, a padded batch,
for the plain detector (transformers' own ResNet backbone), box refinement (timm's ResNet, the layout of the
official checkpoints), box refinement with two stages and untied per-layer heads (`tie_word_embeddings=False`).
float64 agrees to 1e-9; float32 is no further from transformers' float64 run than transformers' own float32 run is,
with a small margin."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.convert.deformable_detr import from_deformable_detr
from deformjax.models.deformable_detr import downsample_mask

SMALL = dict(d_model=64, encoder_layers=2, decoder_layers=2, num_queries=6, encoder_ffn_dim=32, decoder_ffn_dim=32,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2,
             num_labels=3)
CASES = {
    'plain': dict(backbone='transformers'),
    'box_refine': dict(backbone='timm', with_box_refine=True),
    'two_stage': dict(backbone='timm', with_box_refine=True, two_stage=True, two_stage_num_proposals=20),
    # Heads per decoder layer without box refinement (transformers ties none): the converter keeps them apart.
    'plain_untied': dict(backbone='transformers', tie_word_embeddings=False),
}
# Fields compared, and the two-stage ones where the config has them.
FIELDS = ('logits', 'pred_boxes', 'intermediate_hidden_states', 'intermediate_reference_points',
          'init_reference_points')
TWO_STAGE_FIELDS = ('enc_outputs_class', 'enc_outputs_coord_logits')


def _config(backbone: str, **extra):
  from transformers import DeformableDetrConfig, ResNetConfig
  if backbone == 'timm':
    return DeformableDetrConfig(use_timm_backbone=True, backbone='resnet18', use_pretrained_backbone=False,
                                **SMALL, **extra)
  resnet = ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16,
                        layer_type='bottleneck', out_features=['stage2', 'stage3', 'stage4'])
  return DeformableDetrConfig(use_timm_backbone=False, backbone_config=resnet, **SMALL, **extra)


def _perturbed_model(torch, config):
  from transformers import DeformableDetrForObjectDetection
  torch.manual_seed(0)
  model = DeformableDetrForObjectDetection(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, buffer in model.named_buffers():
      if name.endswith('running_var'):
        buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen))
      elif buffer.dtype.is_floating_point:
        buffer.add_(0.1 * torch.randn(buffer.shape, generator=gen))
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def proposal_embedding_in_model_dtype(self, proposals):
  """transformers' `get_proposal_pos_embed` computes in float32 whatever the model's dtype; the float64 comparison
  computes it in float64 (as DeformableDetr does for float64 inputs)."""
  torch = pytest.importorskip('torch')
  num = self.config.d_model // 2
  dim_t = torch.arange(num, dtype=proposals.dtype)
  dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode='floor') / num)
  pos = (proposals.sigmoid() * 2 * math.pi)[:, :, :, None] / dim_t
  return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 96, 80))
  mask = np.ones((2, 96, 80), np.int64)
  mask[1, 70:] = 0
  mask[1, :, 50:] = 0
  return x, mask


def _outputs(out, fields):
  return {f: getattr(out, f).detach().numpy() for f in fields} | {
      'encoder_last_hidden_state': out.encoder_last_hidden_state.detach().numpy()}


@pytest.fixture(scope='module', params=list(CASES))
def case(request):
  """Per case: the config dict, the float64 and float32 state dicts, and transformers' outputs in both dtypes."""
  torch = pytest.importorskip('torch', exc_type=ImportError)
  pytest.importorskip('transformers', exc_type=ImportError)
  extra = CASES[request.param]
  if extra['backbone'] == 'timm':
    pytest.importorskip('timm', exc_type=ImportError)
  config = _config(**extra)
  model = _perturbed_model(torch, config)
  fields = FIELDS + (TWO_STAGE_FIELDS if config.two_stage else ())
  x, mask = _inputs()
  result = dict(name=request.param, config=config.to_dict(), fields=fields)
  with torch.no_grad():
    result['state32'] = {k: v.numpy() for k, v in model.state_dict().items()}
    result['want32'] = _outputs(model(pixel_values=torch.tensor(x, dtype=torch.float32),
                                      pixel_mask=torch.tensor(mask)), fields)
    model = model.double()
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(type(model.model), 'get_proposal_pos_embed', proposal_embedding_in_model_dtype)
      result['want64'] = _outputs(model(pixel_values=torch.tensor(x, dtype=torch.float64),
                                        pixel_mask=torch.tensor(mask)), fields)
    result['state64'] = {k: v.numpy() for k, v in model.state_dict().items()}
  return result


def _ours(case, dtype):
  x, mask = _inputs()
  detector = from_deformable_detr(case[f'state{np.dtype(dtype).itemsize * 8}'], case['config'], param_dtype=dtype)
  out = jax.jit(lambda d, a, b: d(a, b))(detector, jnp.asarray(x.transpose(0, 2, 3, 1), dtype), jnp.asarray(mask))
  got = {f: np.asarray(getattr(out, f)) for f in case['fields']}
  got['encoder_last_hidden_state'] = np.asarray(out.encoder_last_hidden_state)
  maps = nnx.eval_shape(lambda m, a: m(a), detector.backbone, jnp.asarray(x.transpose(0, 2, 3, 1), dtype))
  shapes = detector.encoder.spatial_shapes([m.shape[1:3] for m in maps])
  real = np.concatenate([np.asarray(downsample_mask(jnp.asarray(mask), s)).reshape(2, -1) for s in shapes], 1)
  return got, real


def _error(got, want):
  """max |got - want| / (1 + |want|) over finite entries; infinities (invalid proposals) must coincide."""
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite)
  np.testing.assert_array_equal(got[~finite], want[~finite])
  return float(np.max(np.abs(got[finite] - want[finite]) / (1 + np.abs(want[finite]))))


@pytest.mark.slow
def test_float64_matches_transformers_to_1e9(case):
  with jax.numpy_dtype_promotion('standard'):  # flax's norms take statistics in promote_types(dtype, float32)
    got, real = _ours(case, np.float64)
  want = case['want64']
  for field in case['fields']:
    assert _error(got[field], want[field]) < 1e-9, field
  # The encoder's memory is compared at real pixels (padded ones read sine embeddings of huge arguments).
  assert _error(got['encoder_last_hidden_state'][real], want['encoder_last_hidden_state'][real]) < 1e-9
  assert got['logits'].shape == (2, 20 if case['name'] == 'two_stage' else 6, 3)


@pytest.mark.slow
def test_float32_within_transformers_own_float32_error(case):
  got, _ = _ours(case, np.float32)
  for field in case['fields']:
    want64, theirs32 = case['want64'][field], case['want32'][field].astype(np.float64)
    ours = _error(got[field].astype(np.float64), want64)
    own = _error(theirs32, want64)
    print(f"{case['name']} {field}: ours {ours:.2e}, transformers' float32 {own:.2e}")
    assert ours <= 4 * own + 1e-6, field
