"""Detection study: a small Deformable DETR trained from scratch on digit canvases, evaluated with COCO's AP.

The run is the train system's (`deformjax.train.train`) on `experiments/configs/detection.py`, exactly what
`python -m deformjax.train --config experiments/configs/detection.py` runs: the canvases are
`deformjax.data.digit_canvases` (real MNIST digits placed apart on 48x48 black canvases; the test canvases are
made from digits no training canvas uses), the detector `deformjax.models.DeformableDetr` with iterative box
refinement and a narrow ResNet, the loss `deformjax.detection.detection_loss` (transformers' Deformable DETR loss:
Hungarian matching, focal classification, L1 and GIoU box terms, every decoder layer's auxiliary terms). The
held-out canvases are scored every few epochs with pycocotools, so the table shows how AP grows with training
time. Writes `<name>.json`, `.md` and `.png` (test canvases with their ground truth and their top detections)
under `--out`.

  python -m experiments.detection [--config FILE[:runlocal]] [--config.FIELD=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.data import DatasetSpec, get_spec
from deformjax.detection import post_process_object_detection
from deformjax.train import ConfigError, canvas_sources, model_factory, train
from deformjax.train.steps import normalise
from experiments.common import parse, run_metadata, study_flags, write_results

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'detection.py'
NAME = 'detection_canvas'
_DIGITS = {'mnist5k': 'real MNIST digits', 'digits': "scikit-learn's 8x8 digits"}


def trained_detector(cfg, summary: dict) -> nnx.Module:
  """The detector `train(cfg)` trained, rebuilt as the train system builds it and holding what it returned.

  Args:
    cfg: the run's config (one seed).
    summary: what `train(cfg)` returned (`params`, `model_state`).

  Returns:
    The `DeformableDetr`, in `cfg.dtype`, with the trained parameters and state.
  """
  digits = get_spec(cfg.dataset)
  spec = DatasetSpec('canvases', (cfg.canvas.size, cfg.canvas.size, 3), digits.num_classes)
  model = model_factory(cfg, spec)(cfg.seed)
  nnx.update(model, summary['params'])
  if summary.get('model_state') is not None:
    nnx.update(model, summary['model_state'])
  return model


def predict(model: nnx.Module, images: np.ndarray, batch_size: int, top_k: int) -> list[dict]:
  """Every image's `top_k` detections (transformers' post-processing, no threshold).

  Args:
    model: the detector.
    images: `[N, H, W, C]` in [0, 1], as the canvases hold them (standardised here as the train system does).
    batch_size: images per forward pass.
    top_k: detections kept per image.

  Returns:
    Per image, `scores [top_k]`, `labels [top_k]` and `boxes [top_k, 4]` as (x0, y0, x1, y1) in pixels.
  """
  model.eval()
  forward = nnx.jit(lambda m, x: m(x))
  out: list[dict] = []
  size = images.shape[1:3]
  for i in range(0, len(images), batch_size):
    o = forward(model, normalise(jnp.asarray(images[i:i + batch_size])))
    out += post_process_object_detection(o, threshold=0.0, target_sizes=[size] * len(o.logits), top_k=top_k)
  return out


def run(cfg, plot_images: int, echo: Callable[[str], object] = print) -> tuple[dict, Any, list[dict]]:
  """Trains and evaluates `cfg` with the train system.

  Args:
    cfg: a detection config of one seed (experiments/configs/detection.py).
    plot_images: how many test canvases get their detections for the picture.
    echo: where the train system's lines go.

  Returns:
    `(result, test canvases, the ranked detections of the first plot_images of them)`.
  """
  if cfg.num_seeds != 1:
    raise ConfigError(f'config.num_seeds={cfg.num_seeds}: the study tabulates and draws one run; train several '
                      'seeds with python -m deformjax.train --config experiments/configs/detection.py')
  start = time.time()
  summary = train(cfg, echo=echo)
  model = trained_detector(cfg, summary)
  _, test_set = canvas_sources(cfg)
  preds = predict(model, test_set.images[:plot_images], cfg.eval_batch_size, top_k=100)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kept = ('steps', 'steps_per_epoch', 'first_step_seconds', 'seconds_per_step', 'train_history', 'eval_history',
          'eval', 'devices')
  result = {'name': NAME, 'config': cfg.to_dict(), **run_metadata(), 'parameters': params,
            **{k: summary[k] for k in kept}, 'wall_seconds': time.time() - start}
  return result, test_set, preds


def table(result: dict) -> str:
  """The study's Markdown: what was trained, then COCO's metrics on the held-out canvases after each evaluation.

  Args:
    result: what `run` returned (its `config`, `steps`, timings, `eval_history` and final `eval`).

  Returns:
    A paragraph and a table, one row per evaluation, the final one last.
  """
  c = result['config']
  d = c['canvas']
  step_ms = 'n/a' if result['seconds_per_step'] is None else f"{1e3 * result['seconds_per_step']:.0f}"
  first_s = 'n/a' if result['first_step_seconds'] is None else f"{result['first_step_seconds']:.0f}"
  lines = [f"Deformable DETR ({result['parameters']:,} parameters) trained from scratch by `deformjax.train` for "
           f"{result['steps']} steps ({c['batch_size']} canvases a step, {step_ms} ms "
           f"a step after the first, which compiled in {first_s} s) on "
           f"{d['train_images']} {d['size']}x{d['size']} canvases of {_DIGITS[c['dataset']]}; COCO metrics "
           f"(pycocotools) on {d['test_images']} held-out canvases, "
           + (f"every {c['eval_every_epochs']} epochs and " if c['eval_every_epochs'] else '')
           + 'at the end (seconds: wall time of training when the evaluation began).', '',
           '| epoch | step | seconds | AP | AP50 | AP75 | AR100 | loss |', '|---|---|---|---|---|---|---|---|']
  final = {'epoch': result['steps'] / result['steps_per_epoch'], 'step': result['steps'], 'seconds': None,
           **result['eval']['baseline']}
  for e in [*result['eval_history'], final]:
    m = e.get('baseline', e)
    secs = '' if e['seconds'] is None else f"{e['seconds']:.0f}"
    lines.append(f"| {e['epoch']:g} | {e['step']} | {secs} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f} | "
                 f"{m['AR100']:.3f} | {m['loss']:.3f} |")
  return '\n'.join(lines)


def plot(test_set, preds: list[dict], images: int, top_k: int, path: pathlib.Path) -> None:
  """Test canvases with their ground truth (green, dashed) and their `top_k` detections (red, with scores).

  Args:
    test_set: the test canvases (`DetectionCanvases`).
    preds: the ranked detections of the first canvases (`predict`).
    images: how many canvases to draw (two rows beyond four).
    top_k: detections drawn per canvas.
    path: the PNG written.
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  k = min(images, len(preds))
  size = test_set.images.shape[1]
  rows = 2 if k > 4 else 1
  cols = -(-k // rows)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + 0.3), squeeze=False)
  for ax in axes.flat[k:]:
    ax.set_axis_off()
  for ax, image, label, pred in zip(axes.flat, test_set.images, test_set.labels(), preds):
    ax.imshow(image[..., 0], cmap='gray', extent=(0, size, size, 0))
    for cx, cy, w, h in label['boxes'] * size:
      ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, ec='lime', lw=1, ls='--'))
    placed: list[tuple[float, float]] = []
    for (x0, y0, x1, y1), c, s in zip(pred['boxes'][:top_k], pred['labels'][:top_k], pred['scores'][:top_k]):
      ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='red', lw=1.2, alpha=0.4 + 0.6 * float(s)))
      if s < 0.2:  # the faint ones unlabelled
        continue
      y = y0 - 1
      while any(abs(x0 - px) < 12 and abs(y - py) < 4 for px, py in placed):  # a label above the one there
        y -= 4.5
      placed.append((x0, y))
      ax.text(x0, y, f'{c} {s:.2f}', color='red', fontsize=7)
    ax.set_xlim(0, size)
    ax.set_ylim(size, -10)
    ax.set_axis_off()
  fig.suptitle(f'held-out canvases: ground truth (green, dashed) and the top {top_k} detections of each\n(red, '
               'fainter for lower scores; labelled digit and score from 0.2)', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(args=None) -> dict:
  """`python -m experiments.detection [--config FILE[:runlocal]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  from absl import flags

  from deformjax.train.cli import command_line, run_or_exit

  argv = command_line(args, 'experiments.detection')
  fv, config, out_flag = study_flags(argv, DEFAULT_CONFIG)
  images = flags.DEFINE_integer('plot_images', 8, 'test canvases drawn in the picture', flag_values=fv)
  top_k = flags.DEFINE_integer('plot_top_k', 3, 'detections drawn per canvas (the highest scores)', flag_values=fv)
  cfg = parse(fv, argv, config)
  out = pathlib.Path(out_flag.value)
  result, test_set, preds = run_or_exit(run, cfg, images.value)
  md = (f"# {NAME}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}. "
        f"Wall time of the whole study: {result['wall_seconds']:.0f} s.\n\n{table(result)}\n")
  write_results(NAME, result, md, out)
  plot(test_set, preds, images.value, top_k.value, out / f'{NAME}.png')
  print('\n' + table(result))
  print(f'wrote {out / NAME}.json, .md, .png')
  return result


if __name__ == '__main__':
  main()
