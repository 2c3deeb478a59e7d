"""Detection: boxes, Hungarian matching, Deformable DETR's loss, post-processing and COCO evaluation.

Works on the outputs of any DETR-style detector (`logits [N, Q, num_labels]`, `pred_boxes [N, Q, 4]` as
(cx, cy, w, h) in [0, 1]), such as :class:`deformjax.models.DeformableDetr`'s, and on labels in transformers'
format (a list of per-image dicts with `class_labels` and `boxes`) or padded for `jax.jit`. Needs jax and numpy to
import; the matcher imports scipy and the evaluator pycocotools when they run (`pip install 'deformjax[detection]'`).
"""

from deformjax.detection.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)
from deformjax.detection.coco import COCO_METRICS, coco_evaluate
from deformjax.detection.loss import detection_loss, pad_labels, sigmoid_focal_loss
from deformjax.detection.matcher import hungarian_match, matching_cost
from deformjax.detection.postprocess import post_process_object_detection
from deformjax.detection.task import Detection

__all__ = ['COCO_METRICS', 'Detection', 'box_area', 'box_cxcywh_to_xyxy', 'box_iou', 'box_xyxy_to_cxcywh',
           'coco_evaluate', 'detection_loss', 'generalized_box_iou', 'hungarian_match', 'matching_cost', 'pad_labels',
           'post_process_object_detection', 'sigmoid_focal_loss']
