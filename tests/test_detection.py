"""deformjax.detection: boxes, the Hungarian matcher, Deformable DETR's loss, post-processing, COCO evaluation.

Every oracle is written here from the formula in numpy float64: the matcher against brute force over all
assignments, each loss term against its definition, post-processing against a sort. transformers' own loss is
the oracle in test_detection_slow.py.
"""

from __future__ import annotations

import itertools

import jax
import jax.test_util
import numpy as np
import pytest

from deformjax import detection


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _xyxy(b):
  return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _giou_np(a, b):
  """Generalized IoU of corner boxes a [4] and b [4], written from its definition."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def _cost_np(logit, pred, label, box):
  """Deformable DETR's matching cost of one query against one target (class 1, L1 5, GIoU 2; alpha .25, gamma 2)."""
  p = _sigmoid(logit[label])
  focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p**2 * -np.log(1 - p + 1e-8)
  return focal + 5 * np.abs(pred - box).sum() - 2 * _giou_np(_xyxy(pred), _xyxy(box))


def _random_boxes(rng, shape):
  return np.concatenate([rng.uniform(0.2, 0.8, (*shape, 2)), rng.uniform(0.05, 0.4, (*shape, 2))], -1)


def _case(seed, n=2, q=5, c=3, counts=(2, 3), t=4):
  rng = np.random.default_rng(seed)
  logits, pred = rng.normal(size=(n, q, c)) * 2, _random_boxes(rng, (n, q))
  labels = [{'class_labels': rng.integers(0, c, k), 'boxes': _random_boxes(rng, (k,))} for k in counts]
  return logits, pred, labels, detection.pad_labels(labels, t)


def _brute_force(logits, pred, label):
  """Least-cost query for every target of one image, by trying every injective assignment."""
  k, q = len(label['class_labels']), len(pred)
  cost = np.array([[_cost_np(logits[i], pred[i], label['class_labels'][j], label['boxes'][j]) for j in range(k)]
                   for i in range(q)])
  if k <= q:
    best = min(itertools.permutations(range(q), k), key=lambda rows: sum(cost[r, j] for j, r in enumerate(rows)))
    return list(best), cost
  best = min(itertools.permutations(range(k), q), key=lambda cols: sum(cost[i, j] for i, j in enumerate(cols)))
  out = [-1] * k
  for i, j in enumerate(best):
    out[j] = i
  return out, cost


# --- boxes ------------------------------------------------------------------------------------------------------


def test_box_formats_round_trip_and_match_the_formula():
  boxes = _random_boxes(np.random.default_rng(0), (3, 5))
  np.testing.assert_allclose(detection.box_cxcywh_to_xyxy(boxes), _xyxy(boxes), rtol=0, atol=1e-15)
  np.testing.assert_allclose(detection.box_xyxy_to_cxcywh(detection.box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-15)
  np.testing.assert_allclose(detection.box_area(_xyxy(boxes)), boxes[..., 2] * boxes[..., 3], rtol=1e-14)


def test_generalized_box_iou_and_iou_match_the_formula_pairwise_and_batched():
  rng = np.random.default_rng(1)
  a, b = _xyxy(_random_boxes(rng, (2, 4))), _xyxy(_random_boxes(rng, (2, 3)))
  giou = detection.generalized_box_iou(a, b)
  assert giou.shape == (2, 4, 3)
  want = np.array([[[_giou_np(a[n, i], b[n, j]) for j in range(3)] for i in range(4)] for n in range(2)])
  np.testing.assert_allclose(giou, want, rtol=1e-12)
  np.testing.assert_allclose(detection.generalized_box_iou(a[0], a[0]).diagonal(), 1.0, rtol=1e-12)
  assert float(detection.box_iou(np.array([[0.0, 0, 2, 1]]), np.array([[1.0, 0, 3, 1]]))[0, 0]) == pytest.approx(1 / 3)


def test_boxes_refuse_a_wrong_last_dimension_by_name():
  with pytest.raises(ValueError, match=r'boxes must have shape \[..., 4\], got \(2, 3\)'):
    detection.box_cxcywh_to_xyxy(np.zeros((2, 3)))
  with pytest.raises(ValueError, match='boxes1 .* and boxes2 .* same leading'):
    detection.generalized_box_iou(np.zeros((2, 1, 4)), np.zeros((3, 1, 4)))


# --- matcher ----------------------------------------------------------------------------------------------------


def test_matching_cost_is_the_formula():
  logits, pred, labels, padded = _case(2)
  cost = detection.matching_cost(logits, pred, padded['class_labels'], padded['boxes'])
  for n, label in enumerate(labels):
    for i in range(pred.shape[1]):
      for j in range(len(label['class_labels'])):
        assert float(cost[n, i, j]) == pytest.approx(_cost_np(logits[n, i], pred[n, i], label['class_labels'][j],
                                                              label['boxes'][j]), rel=1e-12)


@pytest.mark.parametrize('seed,q,counts', [(0, 5, (2, 3)), (1, 4, (4, 1)), (2, 6, (0, 3)), (3, 3, (5, 2))])
def test_hungarian_match_is_the_brute_force_optimum(seed, q, counts):
  pytest.importorskip('scipy')
  logits, pred, labels, padded = _case(seed, q=q, counts=counts, t=5)
  got = np.asarray(detection.hungarian_match(logits, pred, padded['class_labels'], padded['boxes'],
                                             padded['label_mask']))
  for n, label in enumerate(labels):
    want, _ = _brute_force(logits[n], pred[n], label)
    k = len(want)
    assert got[n, :k].tolist() == want
    assert (got[n, k:] == -1).all()  # padded slots are never matched


def test_hungarian_match_under_jit_and_vmap_and_without_gradient():
  pytest.importorskip('scipy')
  logits, pred, _, padded = _case(4, counts=(3, 2))
  args = (logits, pred, padded['class_labels'], padded['boxes'], padded['label_mask'])
  eager = detection.hungarian_match(*args)
  np.testing.assert_array_equal(jax.jit(detection.hungarian_match)(*args), eager)
  stacked = [np.stack([a, a[::-1]]) for a in args]  # a leading batch of two: the images, then in reverse
  batched = jax.vmap(detection.hungarian_match)(*stacked)
  np.testing.assert_array_equal(batched, np.stack([eager, eager[::-1]]))
  grad = jax.grad(lambda b: detection.hungarian_match(logits, b, *args[2:]).sum().astype(b.dtype))(pred)
  np.testing.assert_array_equal(grad, 0)


def test_hungarian_match_refuses_mismatched_shapes_by_name():
  with pytest.raises(ValueError, match=r'pred_boxes must have shape \[N, Q, 4\] = \(1, 2, 4\), got \(1, 3, 4\)'):
    detection.hungarian_match(np.zeros((1, 2, 3)), np.zeros((1, 3, 4)), np.zeros((1, 1), np.int32),
                              np.zeros((1, 1, 4)))
  with pytest.raises(ValueError, match='label_mask must have the shape of class_labels'):
    detection.hungarian_match(np.zeros((1, 2, 3)), np.zeros((1, 2, 4)), np.zeros((1, 1), np.int32),
                              np.zeros((1, 1, 4)), np.ones((1, 2), bool))


# --- loss -------------------------------------------------------------------------------------------------------


def _terms_np(logits, pred, labels, num_boxes, agnostic=False):
  """loss_ce, loss_bbox, loss_giou, cardinality_error of one output set, from their definitions."""
  ce = l1 = giou = 0.0
  card = []
  for n, label in enumerate(labels):
    cls = np.zeros_like(label['class_labels']) if agnostic else label['class_labels']
    rows, _ = _brute_force(logits[n], pred[n], {'class_labels': cls, 'boxes': label['boxes']})
    target = np.zeros_like(logits[n])
    for j, i in enumerate(rows):
      if i >= 0:
        target[i, cls[j]] = 1
        l1 += np.abs(pred[n, i] - label['boxes'][j]).sum()
        giou += 1 - _giou_np(_xyxy(pred[n, i]), _xyxy(label['boxes'][j]))
    p, x = _sigmoid(logits[n]), logits[n]
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    ce += ((0.25 * target + 0.75 * (1 - target)) * (1 - p_t) ** 2 * bce).sum()
    card.append(abs((_sigmoid(x).max(-1) > 0.5).sum() - len(cls)))
  return {'loss_ce': ce / num_boxes, 'loss_bbox': l1 / num_boxes, 'loss_giou': giou / num_boxes,
          'cardinality_error': np.mean(card)}


def test_each_loss_term_is_its_formula_with_aux_and_encoder_sets():
  pytest.importorskip('scipy')
  rng = np.random.default_rng(5)
  logits, pred, labels, padded = _case(5, q=4, counts=(2, 3))
  aux = [{'logits': rng.normal(size=logits.shape), 'pred_boxes': _random_boxes(rng, pred.shape[:2])}]
  enc_logits, enc_boxes = rng.normal(size=(2, 6, 3)), _random_boxes(rng, (2, 6))
  outputs = {'logits': logits, 'pred_boxes': pred, 'auxiliary_outputs': aux, 'enc_outputs_class': enc_logits,
             'enc_outputs_coord_logits': np.log(enc_boxes / (1 - enc_boxes))}
  config = {'auxiliary_loss': True, 'bbox_loss_coefficient': 5, 'giou_loss_coefficient': 2}
  loss, parts = detection.detection_loss(outputs, labels, config, encoder_loss=True)
  want = {}
  for suffix, (lg, pb, agnostic) in {'': (logits, pred, False), '_0': (aux[0]['logits'], aux[0]['pred_boxes'], False),
                                     '_enc': (enc_logits, enc_boxes, True)}.items():
    want.update({k + suffix: v for k, v in _terms_np(lg, pb, labels, 5, agnostic).items()})
  assert sorted(parts) == sorted(want)
  for k, v in want.items():
    assert float(parts[k]) == pytest.approx(v, rel=1e-11), k
  total = sum(want[f'loss_ce{s}'] + 5 * want[f'loss_bbox{s}'] + 2 * want[f'loss_giou{s}'] for s in ('', '_0', '_enc'))
  assert float(loss) == pytest.approx(total, rel=1e-11)


def test_loss_without_targets_normalises_by_one_and_has_no_box_terms():
  pytest.importorskip('scipy')
  logits = np.random.default_rng(6).normal(size=(1, 3, 2))
  empty = [{'class_labels': np.zeros(0, np.int64), 'boxes': np.zeros((0, 4))}]
  _, parts = detection.detection_loss({'logits': logits, 'pred_boxes': np.full((1, 3, 4), 0.5)}, empty, {})
  assert float(parts['loss_bbox']) == 0 and float(parts['loss_giou']) == 0
  assert float(parts['loss_ce']) == pytest.approx(_terms_np(logits, np.full((1, 3, 4), .5), empty, 1)['loss_ce'])


def test_loss_under_jit_with_padded_labels_equals_the_list_form_and_its_gradient_is_the_formulas():
  pytest.importorskip('scipy')
  logits, pred, labels, padded = _case(7, counts=(1, 3))
  eager, _ = detection.detection_loss({'logits': logits, 'pred_boxes': pred}, labels, {})

  def f(lg, pb):
    return detection.detection_loss({'logits': lg, 'pred_boxes': pb}, padded, {})[0]

  assert float(jax.jit(f)(logits, pred)) == pytest.approx(float(eager), rel=1e-13)
  # The match is piecewise constant: finite differences around this point see one assignment.
  jax.test_util.check_grads(f, (logits, pred), order=1, modes=['rev'], eps=1e-6)
  assert np.isfinite(jax.grad(f, argnums=(0, 1))(logits, pred)[1]).all()


def test_loss_refuses_missing_outputs_and_labels_by_name():
  outputs = {'logits': np.zeros((1, 2, 3)), 'pred_boxes': np.full((1, 2, 4), 0.5)}
  with pytest.raises(ValueError, match='missing .*label_mask'):
    detection.detection_loss(outputs, {'class_labels': np.zeros((1, 1)), 'boxes': np.zeros((1, 1, 4))}, {})
  with pytest.raises(ValueError, match="auxiliary_loss.* no auxiliary_outputs"):
    detection.detection_loss(outputs, [], {'auxiliary_loss': True})
  with pytest.raises(ValueError, match='encoder_loss=True needs enc_outputs_class'):
    detection.detection_loss(outputs, [], {}, encoder_loss=True)
  with pytest.raises(ValueError, match='more than max_targets=1'):
    detection.pad_labels([{'class_labels': [1, 2], 'boxes': np.zeros((2, 4))}], max_targets=1)


# --- post-processing --------------------------------------------------------------------------------------------


def test_post_processing_is_top_k_over_queries_and_classes_scaled_and_thresholded():
  rng = np.random.default_rng(8)
  logits, pred = rng.normal(size=(2, 6, 3)), _random_boxes(rng, (2, 6))
  sizes = [(40, 60), (50, 30)]
  got = detection.post_process_object_detection({'logits': logits, 'pred_boxes': pred}, threshold=0.4,
                                                target_sizes=sizes, top_k=5)
  for n, (h, w) in enumerate(sizes):
    prob = _sigmoid(logits[n]).reshape(-1)
    order = np.argsort(-prob)[:5]
    order = order[prob[order] > 0.4]
    np.testing.assert_allclose(got[n]['scores'], prob[order], rtol=1e-12)
    np.testing.assert_array_equal(got[n]['labels'], order % 3)
    np.testing.assert_allclose(got[n]['boxes'], _xyxy(pred[n, order // 3]) * [w, h, w, h], rtol=1e-12)
  relative = detection.post_process_object_detection({'logits': logits, 'pred_boxes': pred}, threshold=0.0)
  assert all(len(r['scores']) == 18 for r in relative)  # top_k 100 > 6 * 3: every pair
  with pytest.raises(ValueError, match=r'target_sizes must be \[N, 2\]'):
    detection.post_process_object_detection({'logits': logits, 'pred_boxes': pred}, target_sizes=[(1, 1)])


# --- COCO evaluation --------------------------------------------------------------------------------------------


def _coco_case():
  rng = np.random.default_rng(9)
  targets = [{'class_labels': np.array([0, 1, 0]), 'boxes': np.array([[0.25, 0.25, 0.3, 0.3], [0.7, 0.7, 0.4, 0.3],
                                                                      [0.7, 0.25, 0.2, 0.3]])},
             {'class_labels': np.array([1]), 'boxes': np.array([[0.5, 0.5, 0.6, 0.5]])}]
  sizes = [(100, 100), (80, 120)]
  preds = []
  for t, (h, w) in zip(targets, sizes):
    preds.append({'scores': rng.uniform(0.5, 1, len(t['class_labels'])), 'labels': t['class_labels'],
                  'boxes': _xyxy(t['boxes']) * [w, h, w, h]})
  return preds, targets, sizes


def test_coco_evaluation_of_perfect_predictions_is_one():
  pytest.importorskip('pycocotools')
  preds, targets, sizes = _coco_case()
  metrics = detection.coco_evaluate(preds, targets, sizes)
  assert set(metrics) == set(detection.COCO_METRICS)
  assert metrics['AP'] == metrics['AP50'] == metrics['AP75'] == metrics['AR100'] == 1.0


def test_coco_evaluation_with_one_box_missing_is_the_101_point_value():
  pytest.importorskip('pycocotools')
  preds, targets, sizes = _coco_case()
  preds[0] = {k: v[:2] for k, v in preds[0].items()}  # the second class-0 box of image 0 is never predicted
  metrics = detection.coco_evaluate(preds, targets, sizes)
  # Class 0: recall 1/2 at precision 1 -> 51 of COCO's 101 recall points; class 1: 1.0. AP is their mean.
  assert metrics['AP'] == pytest.approx((51 / 101 + 1) / 2, abs=1e-12)
  assert metrics['AP50'] == metrics['AP75'] == metrics['AP']
  none = detection.coco_evaluate([{'scores': [], 'labels': [], 'boxes': np.zeros((0, 4))}] * 2, targets, sizes)
  assert none['AP'] == 0.0


# --- the study ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_detection_study_runlocal_trains_evaluates_and_writes(tmp_path):
  """The study end to end at its runlocal config, through the train system: two steps, COCO evaluation, the
  result files and the picture of the top detections."""
  pytest.importorskip('scipy')
  pytest.importorskip('pycocotools')
  pytest.importorskip('sklearn')
  from experiments import detection as study

  result = study.main(['--config', f'{study.DEFAULT_CONFIG}:runlocal', '--config.progress=false', '--out',
                       str(tmp_path), '--plot_images=2'])
  assert result['steps'] == 2 and len(result['train_history']) == 2
  assert np.isfinite(result['train_history'][-1]['loss'])
  assert 0.0 <= result['eval']['baseline']['AP50'] <= 1.0
  assert {p.name for p in tmp_path.iterdir()} >= {'detection_canvas.json', 'detection_canvas.md',
                                                  'detection_canvas.png'}
  assert '| 1 | 2 |' in (tmp_path / 'detection_canvas.md').read_text()  # the final evaluation's row


def test_detection_study_config_and_table():
  """The fast sibling of the runlocal run: both configs are valid train configs whose detector the model accepts,
  and the table renders every evaluation of a result."""
  from deformjax.train import validate
  from experiments import detection as study
  from experiments.configs import detection as configs

  for arg in (None, 'runlocal'):
    cfg = configs.get_config(arg)
    validate(cfg, 1)
    assert cfg.task == 'detection' and cfg.detector.with_box_refine
    assert cfg.canvas.digit_size[1] <= cfg.canvas.size
  with pytest.raises(ValueError, match="'' or 'runlocal'"):
    configs.get_config('mnist')
  metrics = {'AP': 0.25, 'AP50': 0.5, 'AP75': 0.125, 'AR100': 0.75, 'loss': 2.0}
  result = {'parameters': 10, 'config': configs.get_config().to_dict(), 'steps': 750, 'steps_per_epoch': 375,
            'seconds_per_step': 0.1, 'first_step_seconds': 20.0,
            'eval_history': [{'step': 375, 'epoch': 1, 'seconds': 60.0, 'baseline': dict(metrics, AP50=0.25)}],
            'eval': {'baseline': metrics}}
  text = study.table(result)
  assert '| 1 | 375 | 60 | 0.250 | 0.250 | 0.125 | 0.750 | 2.000 |' in text
  assert '| 2 | 750 |  | 0.250 | 0.500 | 0.125 | 0.750 | 2.000 |' in text
  assert 'every 2 epochs and at the end' in text


# --- the train system's task ---------------------------------------------------------------------------------------


def test_detection_task_layout_description_checks_loss_sums_and_coco_evaluator():
  pytest.importorskip('scipy')
  pytest.importorskip('pycocotools')
  from deformjax.data.sources import DatasetSpec

  task = detection.Detection(max_targets=3, loss_config=(('auxiliary_loss', False),))
  assert hash(task) == hash(detection.Detection(max_targets=3, loss_config=(('auxiliary_loss', False),)))
  assert {k: (v.shape, str(v.dtype)) for k, v in task.label_layout(None).items()} == {
      'class_labels': ((3,), 'int32'), 'boxes': ((3, 4), 'float32'), 'label_mask': ((3,), 'bool')}
  records = [{'image': np.zeros((16, 16, 3), np.float32), 'class_labels': np.array([4, 0, 0], np.int32),
              'boxes': np.zeros((3, 4), np.float32), 'label_mask': np.array([True, False, False])}]
  spec = task.describe(records, records)
  assert spec.image_shape == (16, 16, 3) and spec.num_classes == 5
  with pytest.raises(ValueError, match='missing .*label_mask'):
    task.describe([{'image': np.zeros((4, 4, 1)), 'class_labels': 0, 'boxes': 0}], records)
  spec = DatasetSpec('arrays', (16, 16, 3), 3)
  good = {'logits': jax.ShapeDtypeStruct((2, 5, 3), np.float32), 'pred_boxes': jax.ShapeDtypeStruct((2, 5, 4),
                                                                                                    np.float32)}
  task.check_outputs(good, spec)
  with pytest.raises(ValueError, match=r'logits \[2, 5, 4\] .* do not fit \[B, Q, 3\]'):
    task.check_outputs(dict(good, logits=jax.ShapeDtypeStruct((2, 5, 4), np.float32)), spec)

  logits, pred, labels, padded = _case(11, counts=(2, 1), t=3)
  batch = {'image': np.zeros((2, 16, 16, 3), np.float32), **padded}
  outputs = {'logits': logits, 'pred_boxes': pred}
  loss, sums = task.loss(outputs, batch, np.array([1.0, 0.0], np.float32))  # the second example is padding
  alone, parts = detection.detection_loss({'logits': logits[:1], 'pred_boxes': pred[:1]}, labels[:1], {})
  assert float(loss) == pytest.approx(float(alone), rel=1e-6)  # padding's targets leave the loss
  assert float(sums['loss']) == pytest.approx(float(alone), rel=1e-6)  # summed over one real example
  assert sorted(sums) == ['cardinality_error', 'loss', 'loss_bbox', 'loss_ce', 'loss_giou']

  evaluator = task.evaluator(spec)
  hit = (np.arange(3) == padded['class_labels'][..., None]) & padded['label_mask'][..., None]
  perfect = {'logits': np.where(hit, 9.0, -9.0), 'pred_boxes': padded['boxes']}  # a query per target, exact
  evaluator.add({'loss': np.float32(2.0)}, 2, perfect, batch)
  result = evaluator.result()
  assert result['loss'] == 1.0 and result['AP'] == pytest.approx(1.0)
