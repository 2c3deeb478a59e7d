"""deformjax.detection against transformers' Deformable DETR loss (slow tier; skipped without torch/transformers).

The loss alone (`DeformableDetrForObjectDetectionLoss`, its matcher and criterion) on the same logits, boxes and
labels, with the auxiliary sets and the two-stage encoder set; and the whole detector's loss and the gradient of
the loss with respect to every parameter against `DeformableDetrForObjectDetection(labels=...)` in float64, for
the plain detector, box refinement (timm's ResNet) and box refinement with two stages.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax import detection
from tests.test_deformable_detr_parity import proposal_embedding_in_model_dtype

pytestmark = pytest.mark.slow

LOSS_CONFIG = dict(class_cost=1, bbox_cost=5, giou_cost=2, focal_alpha=0.25, bbox_loss_coefficient=5,
                   giou_loss_coefficient=2, auxiliary_loss=True)


def _boxes(rng, shape):
  return np.concatenate([rng.uniform(0.2, 0.8, (*shape, 2)), rng.uniform(0.05, 0.4, (*shape, 2))], -1)


def _labels(rng, counts, num_labels):
  return [{'class_labels': rng.integers(0, num_labels, k), 'boxes': _boxes(rng, (k,))} for k in counts]


def _torch_labels(torch, labels, dtype):
  return [{'class_labels': torch.as_tensor(lab['class_labels'], dtype=torch.int64),
           'boxes': torch.as_tensor(lab['boxes'], dtype=dtype)} for lab in labels]


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_loss_and_loss_dict_equal_transformers_with_auxiliary_and_encoder_sets(dtype):
  torch = pytest.importorskip('torch', exc_type=ImportError)
  pytest.importorskip('scipy')
  loss_module = pytest.importorskip('transformers.loss.loss_deformable_detr', exc_type=ImportError)
  rng = np.random.default_rng(0)
  layers, n, q, c, s = 3, 3, 7, 5, 11
  logits = rng.normal(size=(layers, n, q, c)).astype(dtype)
  boxes = _boxes(rng, (layers, n, q)).astype(dtype)
  enc_class, enc_coord = rng.normal(size=(n, s, c)).astype(dtype), rng.normal(size=(n, s, 4)).astype(dtype)
  labels = _labels(rng, (2, 0, 4), c)
  tdtype = getattr(torch, dtype)
  config = SimpleNamespace(**LOSS_CONFIG, decoder_layers=layers, num_labels=c)
  t = {k: torch.from_numpy(v) for k, v in dict(logits=logits, boxes=boxes, enc_class=enc_class).items()}
  tlabels = _torch_labels(torch, labels, tdtype)
  want_loss, want, _ = loss_module.DeformableDetrForObjectDetectionLoss(
      t['logits'][-1], tlabels, 'cpu', t['boxes'][-1], config, t['logits'], t['boxes'])
  # The two-stage set as the original Deformable DETR scores it: class-agnostic targets, the same criterion.
  matcher = loss_module.DeformableDetrHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
  criterion = loss_module.DeformableDetrImageLoss(matcher, c, 0.25, ['labels', 'boxes', 'cardinality'])
  agnostic = [dict(lab, class_labels=torch.zeros_like(lab['class_labels'])) for lab in tlabels]
  enc = criterion({'logits': t['enc_class'], 'pred_boxes': torch.from_numpy(enc_coord).sigmoid()}, agnostic)
  want.update({k + '_enc': v for k, v in enc.items()})
  want_loss = want_loss + enc['loss_ce'] + 5 * enc['loss_bbox'] + 2 * enc['loss_giou']

  outputs = {'logits': logits[-1], 'pred_boxes': boxes[-1], 'enc_outputs_class': enc_class,
             'enc_outputs_coord_logits': enc_coord,
             'auxiliary_outputs': [{'logits': logits[i], 'pred_boxes': boxes[i]} for i in range(layers - 1)]}
  jlabels = [dict(lab, boxes=lab['boxes'].astype(dtype)) for lab in labels]
  loss, parts = jax.jit(lambda o, lab: detection.detection_loss(o, lab, LOSS_CONFIG, encoder_loss=True))(
      outputs, detection.pad_labels(jlabels))
  tol = dict(rtol=1e-12, atol=1e-12) if dtype == 'float64' else dict(rtol=2e-6, atol=1e-6)
  assert sorted(parts) == sorted(want)
  for k, v in want.items():
    # transformers counts the cardinality error in float32 whatever the dtype (`card_pred.float()`).
    np.testing.assert_allclose(float(parts[k]), float(v), **(dict(rtol=1e-7) if 'cardinality' in k else tol),
                               err_msg=k)
  np.testing.assert_allclose(float(loss), float(want_loss), **tol)


# --- the whole detector ------------------------------------------------------------------------------------------

_TINY = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_n_points=2, decoder_n_points=2, num_feature_levels=3,
             num_queries=5, two_stage_num_proposals=6, num_labels=3, auxiliary_loss=True, dropout=0.0,
             use_pretrained_backbone=False, disable_custom_kernels=True)
_VARIANTS = {'plain': {}, 'box_refine_timm': dict(with_box_refine=True),
             'two_stage': dict(with_box_refine=True, two_stage=True)}




def _detector(torch, variant):
  from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

  if variant == 'box_refine_timm':
    backbone = dict(use_timm_backbone=True, backbone='resnet18')
  else:
    backbone = dict(use_timm_backbone=False, backbone=None, backbone_config=ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type='basic',
        out_features=['stage2', 'stage3', 'stage4']))
  config = DeformableDetrConfig(**_TINY, **backbone, **_VARIANTS[variant])
  torch.manual_seed(0)
  model = DeformableDetrForObjectDetection(config).double().eval()
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():  # every parameter and every batch-norm statistic moved off its initial value
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    for name, b in model.named_buffers():
      if name.endswith(('running_mean', 'running_var')):
        b.copy_(b + torch.rand(b.shape, generator=gen, dtype=b.dtype) * 0.2)
  return model


@pytest.mark.parametrize('variant', list(_VARIANTS))
def test_detector_loss_and_parameter_gradients_equal_transformers_in_float64(variant):
  torch = pytest.importorskip('torch', exc_type=ImportError)
  pytest.importorskip('transformers', exc_type=ImportError)
  pytest.importorskip('scipy')
  if variant == 'box_refine_timm':
    pytest.importorskip('timm', exc_type=ImportError)
  from deformjax.convert import from_deformable_detr, to_deformable_detr_state_dict

  model = _detector(torch, variant)
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(2, 3, 64, 56))
  mask = np.ones((2, 64, 56), np.int64)
  mask[1, 48:] = 0
  mask[1, :, 40:] = 0
  labels = _labels(rng, (2, 1), 3)
  with pytest.MonkeyPatch.context() as patch:
    # transformers' `get_proposal_pos_embed` casts the two-stage proposals to float32 (`torch.arange(...,
    # dtype=torch.float32)`, `proposals.sigmoid().to(torch.float32)`) and computes their sine embedding there even in
    # a float64 model: unpatched, every gradient behind the queries it feeds (pos_trans, the decoder, the heads)
    # differs by up to 6e-8 and the loss by 1e-8. Patched to compute in the model's dtype (as DeformableDetr does),
    # the largest gradient difference measured is 8e-15.
    patch.setattr(type(model.model), 'get_proposal_pos_embed', proposal_embedding_in_model_dtype)
    out = model(torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask),
                labels=_torch_labels(torch, labels, torch.float64))
  out.loss.backward()
  config = model.config.to_dict()
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  with jax.numpy_dtype_promotion('standard'):  # flax's norms take float64 statistics in promote_types(..)
    detector = from_deformable_detr(state, config, param_dtype=np.float64)
    graphdef, params, rest = nnx.split(detector, nnx.Param, ...)
    x, m = jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask.astype(bool))
    padded = detection.pad_labels(labels)

    def loss_fn(p):
      return detection.detection_loss(nnx.merge(graphdef, p, rest)(x, m), padded, config)

    (loss, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    nnx.update(detector, grads)  # the gradient, laid out as parameters, read back under transformers' names
    grad_state = to_deformable_detr_state_dict(detector)
  np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-8)
  assert sorted(parts) == sorted(out.loss_dict)
  for k, v in out.loss_dict.items():
    tol = dict(rtol=1e-7) if 'cardinality' in k else dict(rtol=1e-8, atol=1e-12)  # transformers' is float32
    np.testing.assert_allclose(float(parts[k]), float(v), **tol, err_msg=k)
  # The detector shares the heads transformers ties (`_tied_weights_keys`), so the two hold the same parameters and
  # a shared head's gradient, the sum over the layers that use it, is compared under its name as it is.
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
  checked = 0
  for name, p in model.named_parameters():
    if p.grad is None:
      continue
    want = p.grad.numpy()
    np.testing.assert_allclose(grad_state[name], want, rtol=1e-7, atol=1e-9 * max(1.0, np.abs(want).max()),
                               err_msg=name)
    checked += 1
  assert checked > 50


def test_parameter_counts_and_shared_heads_equal_transformers():
  """The fast tier's fixed parameter counts are transformers' own, and the detector shares a head (one module under
  several indices) exactly where transformers ties one (one tensor under several names)."""
  torch = pytest.importorskip('torch', exc_type=ImportError)
  transformers = pytest.importorskip('transformers', exc_type=ImportError)
  from deformjax.models import DeformableDetr
  from tests.test_deformable_detr import HEAD_CONFIGS, PARAMETER_COUNTS

  for name, config in HEAD_CONFIGS.items():
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(
        **config, use_timm_backbone=False, use_pretrained_backbone=False))
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name], name
    detector = nnx.eval_shape(lambda config=config: DeformableDetr(config, rngs=nnx.Rngs(0)))
    for head in ('class_embed', 'bbox_embed'):
      modules = getattr(model, head)
      for i in range(1, len(modules)):
        tied = modules[i].weight is modules[0].weight if head == 'class_embed' else (
            modules[i].layers[0].weight is modules[0].layers[0].weight)
        assert (getattr(detector, head)[i] is getattr(detector, head)[0]) == tied, (name, head, i)



def test_train_system_trains_and_evaluates_a_detector_through_the_detection_task():
  """`deformjax.train.train` with `Detection`: two sharded steps of a tiny detector on canvases, COCO evaluation."""
  pytest.importorskip('scipy')
  pytest.importorskip('pycocotools')
  pytest.importorskip('sklearn')
  pytest.importorskip('optax')
  from deformjax.data import digit_canvases
  from deformjax.models import DeformableDetr
  from deformjax.train import base_config, train

  config = dict(backbone_config={'model_type': 'resnet', 'embedding_size': 8, 'hidden_sizes': [8, 16, 16, 16],
                                 'depths': [1, 1, 1, 1], 'layer_type': 'basic',
                                 'out_features': ['stage1', 'stage2', 'stage3']},
                use_timm_backbone=False, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_n_points=2,
                decoder_n_points=2, num_feature_levels=3, num_queries=5, num_labels=10, dropout=0.0,
                with_box_refine=True, auxiliary_loss=True)
  kw = dict(size=32, num_digits=(1, 2), digit_size=(10, 16), source='digits')
  sources = (digit_canvases('train', 8, **kw), digit_canvases('test', 4, **kw))
  cfg = base_config()
  cfg.steps, cfg.batch_size, cfg.eval_batch_size, cfg.log_every, cfg.progress = 2, 4, 4, 1, False
  cfg.num_devices, cfg.optimizer, cfg.num_classes = 2, 'adamw', 10
  task = detection.Detection(max_targets=2, loss_config=(('auxiliary_loss', True),))
  summary = train(cfg, model=lambda rngs: DeformableDetr(config, rngs=rngs), sources=sources, task=task)
  assert summary['task'] == 'detection' and summary['steps'] == 2 and summary['devices'] == 2
  history = summary['train_history']
  assert len(history) == 2 and all(np.isfinite(h['loss']) for h in history)
  assert {'loss_ce', 'loss_bbox', 'loss_giou', 'cardinality_error'} <= set(history[-1])
  evaluation = summary['eval']['baseline']
  assert set(detection.COCO_METRICS) <= set(evaluation) and 0.0 <= evaluation['AP50'] <= 1.0
