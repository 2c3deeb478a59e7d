"""Detection study: a small Deformable DETR trained from scratch on digit canvases, evaluated with COCO's AP.

The canvases are `deformjax.data.digit_canvases` (real MNIST digits placed apart on 64x64 black canvases; the
test canvases are made from digits no training canvas uses). The detector is `deformjax.models.DeformableDetr`
with iterative box refinement and a narrow ResNet; the loss is `deformjax.detection.detection_loss`
(transformers' Deformable DETR loss: Hungarian matching, focal classification, L1 and GIoU box terms, every
decoder layer's auxiliary terms); training runs for a fixed wall-time budget with AdamW, gradient clipping at
0.1 and a tenfold learning-rate drop at the end. Evaluation post-processes as transformers does and scores
with pycocotools. Writes `<name>.json`, `.md` and `.png` (test canvases with their predicted boxes) under
`--out`.

  python -m experiments.detection [--config FILE[:runlocal]] [--config.FIELD=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deformjax.data import digit_canvases
from deformjax.detection import coco_evaluate, detection_loss, post_process_object_detection
from deformjax.models import DeformableDetr
from experiments.common import parse, run_metadata, study_flags, write_results

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'detection.py'
_LABEL_KEYS = ('class_labels', 'boxes', 'label_mask')


def pixels(images: np.ndarray) -> jax.Array:
  """Canvases in [0, 1] to the detector's input range [-1, 1]."""
  return jnp.asarray(images) * 2.0 - 1.0


def make_data(cfg) -> tuple:
  """`(train, test)` canvases as the config's `data` describes them (test from the source's test digits)."""
  d = cfg.data
  kw = dict(size=d.size, num_digits=tuple(d.num_digits), digit_size=tuple(d.digit_size), source=d.source,
            max_overlap=d.max_overlap, seed=cfg.seed)
  return digit_canvases('train', d.train_images, **kw), digit_canvases('test', d.test_images, **kw)


def make_step(graphdef, tx, detector: dict, encoder_loss: bool) -> Callable:
  """The jitted training step: `(params, opt_state, rest, lr_scale, images, labels) -> (params, opt_state,
  loss, loss_dict)`; `lr_scale` multiplies the optimiser's update (AdamW's update is linear in its rate)."""

  def loss_fn(params, rest, images, labels):
    model = nnx.merge(graphdef, params, rest)
    return detection_loss(model(images), labels, detector, encoder_loss=encoder_loss)

  @jax.jit
  def step(params, opt_state, rest, lr_scale, images, labels):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  return step


def train(cfg, train_set, echo: Callable[[str], object] = print) -> tuple[nnx.Module, dict]:
  """Trains the detector for `cfg.train.time_budget_s` seconds (or `max_steps`); returns it and a log."""
  t = cfg.train
  model = DeformableDetr(cfg.detector.to_dict(), deterministic=True, rngs=nnx.Rngs(cfg.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(t.learning_rate, weight_decay=t.weight_decay))
  opt_state = tx.init(params)
  step = make_step(graphdef, tx, cfg.detector.to_dict(), cfg.encoder_loss)
  rng = np.random.default_rng(cfg.seed)
  order, pos, n = rng.permutation(len(train_set)), 0, 0
  start, cpu_start, history, first_step_s = time.time(), time.process_time(), [], None
  while n < t.max_steps and time.time() - start < t.time_budget_s:
    if pos + t.batch_size > len(order):
      order, pos = rng.permutation(len(train_set)), 0
    idx = order[pos:pos + t.batch_size]
    pos += t.batch_size
    elapsed = time.time() - start
    scale = min(1.0, (n + 1) / t.warmup_steps) * (0.1 if elapsed > (1 - t.decay_fraction) * t.time_budget_s else 1.0)
    labels = {k: getattr(train_set, k)[idx] for k in _LABEL_KEYS}
    params, opt_state, loss, parts = step(params, opt_state, rest, jnp.float32(scale), pixels(train_set.images[idx]),
                                          labels)
    n += 1
    if first_step_s is None:  # compilation and the first step
      first_step_s = float(jax.block_until_ready(loss) * 0) + time.time() - start
    if n % t.log_every == 0 or n == 1:
      row = {'step': n, 'seconds': round(time.time() - start, 1),
             'cpu_seconds': round(time.process_time() - cpu_start, 1), 'lr_scale': scale, 'loss': float(loss),
             **{k: float(parts[k]) for k in ('loss_ce', 'loss_bbox', 'loss_giou', 'cardinality_error')}}
      history.append(row)
      echo(f"step {n:5d}  {row['seconds']:6.0f} s ({row['cpu_seconds']:6.0f} s CPU)  loss {row['loss']:.3f}  "
           f"ce {row['loss_ce']:.3f}  l1 {row['loss_bbox']:.3f}  giou {row['loss_giou']:.3f}  card {row['cardinality_error']:.2f}")
  jax.block_until_ready(params)
  wall = time.time() - start
  nnx.update(model, params)
  return model, {'steps': n, 'train_seconds': wall, 'train_cpu_seconds': time.process_time() - cpu_start,
                 'first_step_seconds': first_step_s,
                 'seconds_per_step': (wall - first_step_s) / max(n - 1, 1), 'history': history}


def predict(model: nnx.Module, images: np.ndarray, batch_size: int, threshold: float, top_k: int) -> list[dict]:
  """Post-processed detections (transformers' rule) of every image, boxes in pixels."""
  forward = nnx.jit(lambda m, x: m(x))
  out = []
  size = images.shape[1:3]
  for i in range(0, len(images), batch_size):
    o = forward(model, pixels(images[i:i + batch_size]))
    out += post_process_object_detection(o, threshold=threshold, target_sizes=[size] * len(o.logits), top_k=top_k)
  return out


def evaluate(model: nnx.Module, test_set, cfg) -> tuple[dict, list[dict]]:
  """COCO metrics of the detector on the test canvases, and its detections."""
  e = cfg.eval
  start = time.time()
  preds = predict(model, test_set.images, e.batch_size, e.threshold, e.top_k)
  metrics = coco_evaluate(preds, test_set.labels(), [test_set.images.shape[1:3]] * len(test_set))
  return {**metrics, 'eval_seconds': time.time() - start}, preds


def run(cfg, echo: Callable[[str], object] = print) -> tuple[dict, object, list[dict]]:
  """Makes the data, trains, evaluates; returns the result, the test set and the detections."""
  start = time.time()
  train_set, test_set = make_data(cfg)
  echo(f'{len(train_set)} train / {len(test_set)} test canvases in {time.time() - start:.0f} s')
  model, log = train(cfg, train_set, echo)
  metrics, preds = evaluate(model, test_set, cfg)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  result = {'name': cfg.name, 'config': cfg.to_dict(), **run_metadata(), 'parameters': params, 'train': log,
            'test': metrics, 'wall_seconds': time.time() - start}
  return result, test_set, preds


def table(result: dict) -> str:
  m, log = result['test'], result['train']
  d = result['config']['data']
  lines = [f"Deformable DETR ({result['parameters']:,} parameters) trained from scratch for {log['steps']} steps "
           f"({log['train_seconds']:.0f} s of wall time, {log['train_cpu_seconds']:.0f} s of CPU time, "
           f"{1e3 * log['seconds_per_step']:.0f} ms a step of "
           f"{result['config']['train']['batch_size']} canvases) on {d['train_images']} {d['size']}x{d['size']} "
           f"canvases of {d['source']} digits; COCO metrics (pycocotools) on {d['test_images']} held-out canvases.",
           '', '| ' + ' | '.join(k for k in m if k != 'eval_seconds') + ' |',
           '|' + '---|' * (len(m) - 1), '| ' + ' | '.join(f'{v:.3f}' for k, v in m.items() if k != 'eval_seconds') + ' |']
  return '\n'.join(lines)


def plot(test_set, preds: list[dict], cfg, path: pathlib.Path) -> None:
  """Test canvases with their ground truth (green) and the detections scoring above the plot threshold (red)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  k = min(cfg.eval.plot_images, len(test_set))
  size = test_set.images.shape[1]
  fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.4), squeeze=False)
  for ax, image, label, pred in zip(axes[0], test_set.images, test_set.labels(), preds):
    ax.imshow(image[..., 0], cmap='gray', extent=(0, size, size, 0))
    for cx, cy, w, h in label['boxes'] * size:
      ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, ec='lime', lw=1, ls='--'))
    keep = pred['scores'] > cfg.eval.plot_threshold
    for (x0, y0, x1, y1), c, s in zip(pred['boxes'][keep], pred['labels'][keep], pred['scores'][keep]):
      ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='red', lw=1.2))
      ax.text(x0, y0 - 1, f'{c} {s:.2f}', color='red', fontsize=7)
    ax.set_axis_off()
  fig.suptitle('held-out canvases: ground truth (green, dashed), detections above '
               f'{cfg.eval.plot_threshold} (red: digit, score)', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(args=None) -> dict:
  """`python -m experiments.detection [--config FILE[:runlocal]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  from deformjax.train.cli import command_line

  argv = command_line(args, 'experiments.detection')
  fv, config, out_flag = study_flags(argv, DEFAULT_CONFIG)
  cfg = parse(fv, argv, config)
  out = pathlib.Path(out_flag.value)
  result, test_set, preds = run(cfg)
  md = (f"# {cfg.name}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}. "
        f"Wall time of the whole study: {result['wall_seconds']:.0f} s.\n\n{table(result)}\n")
  write_results(cfg.name, result, md, out)
  plot(test_set, preds, cfg, out / f'{cfg.name}.png')
  print('\n' + table(result))
  print(f'wrote {out / cfg.name}.json, .md, .png')
  return result


if __name__ == '__main__':
  main()
