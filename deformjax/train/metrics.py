"""Metrics: top-1 accuracy for classes, per-class accuracy and mAP for multi-label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ['Accumulator', 'average_precision']


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Per-class average precision (area under the precision-recall steps, as
  sklearn's `average_precision_score`); NaN for a class with no positives.

  Args:
    scores: `[N, K]` real scores (higher = more likely).
    targets: `[N, K]` {0, 1}.
  Returns:
    `[K]` float64.
  """
  scores = np.asarray(scores, np.float64)
  targets = np.asarray(targets) > 0.5
  out = np.full(scores.shape[1], np.nan)
  for k in range(scores.shape[1]):
    pos = targets[:, k].sum()
    if pos == 0:
      continue
    order = np.argsort(-scores[:, k], kind='stable')
    s, t = scores[order, k], targets[order, k]
    # Ties share one threshold: take the counts at the last index of each distinct score.
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall = tp / pos
    out[k] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
  return out


class Accumulator:
  """Sums per-batch metric sums on the host, then divides by the example count."""

  def __init__(self) -> None:
    self.sums: dict[str, np.ndarray] = {}
    self.count = 0.0
    self.scores: list[np.ndarray] = []
    self.targets: list[np.ndarray] = []

  def add(self, sums: Mapping[str, npt.ArrayLike], count: float, scores: npt.ArrayLike | None = None,
          targets: npt.ArrayLike | None = None) -> None:
    """Adds one batch.

    Args:
      sums: metric name -> its sum over the batch's real examples (a scalar, or `[K]` per class).
      count: the batch's real examples.
      scores: `[b, K]` scores of the real examples, kept for average precision (multi-label only).
      targets: `[b, K]` their {0, 1} targets, with `scores`.
    """
    for k, v in sums.items():
      self.sums[k] = self.sums.get(k, 0.0) + np.asarray(v, np.float64)
    self.count += float(count)
    if scores is not None:
      self.scores.append(np.asarray(scores))
      self.targets.append(np.asarray(targets))

  def result(self, class_names: Sequence[str] = ()) -> dict[str, float | dict[str, float]]:
    """Every metric as its mean over the examples added; per-class metrics as `{class name: value}`.

    Args:
      class_names: names of the per-class entries, in class order; empty: '0', '1', ...

    Returns:
      The means, plus 'mean_accuracy' (over classes) with per-class accuracy, and per-class
      'average_precision' and their mean 'mAP' (NaN classes without positives left out) when scores were added.
    """
    out: dict[str, float | dict[str, float]] = {}
    for k, v in self.sums.items():
      mean = v / max(self.count, 1.0)
      if np.ndim(mean) == 0:
        out[k] = float(mean)
      else:
        names = class_names or [str(i) for i in range(len(mean))]
        out[k] = {n: float(x) for n, x in zip(names, mean)}
    if 'per_class_accuracy' in out:
      per_class = out['per_class_accuracy']
      assert isinstance(per_class, dict)  # a per-class sum is an array
      out['mean_accuracy'] = float(np.mean(list(per_class.values())))
    if self.scores:
      ap = average_precision(np.concatenate(self.scores), np.concatenate(self.targets))
      names = class_names or [str(i) for i in range(len(ap))]
      out['average_precision'] = {n: float(x) for n, x in zip(names, ap)}
      out['mAP'] = float(np.nanmean(ap)) if np.any(np.isfinite(ap)) else float('nan')
    return out
