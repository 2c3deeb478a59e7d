"""Deformable DETR on CPU: ours (jitted) beside transformers' `DeformableDetrForObjectDetection`, one process.

The same random weights on both sides: transformers' model is built from a `DeformableDetrConfig` (timm's ResNet
backbone, no pretrained weights), every parameter moved off its initialisation, and converted with
`deformjax.convert.from_deformable_detr`; both run the same padded batch (NCHW there, NHWC here), in eval mode
(no dropout). Timed: the forward (logits and boxes), and the forward + backward of one scalar loss of the outputs
(`sum(sigmoid(logits)) + sum(pred_boxes)`, the same on both sides) with respect to every trainable parameter.
Median of interleaved runs after warm-up (`jax.block_until_ready`; transformers under `torch.no_grad` for the
forward). Writes bench_deformable_detr_cpu.json / .md under `--out` (runs/; `--out experiments/results` refreshes
the committed ones). The config (experiments/configs/bench_deformable_detr.py) holds every setting.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common import bench_main, benchmark_header, benchmark_metadata, interleaved_ms, jax_call

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'bench_deformable_detr.py'


def _torch_model(cfg):
  import torch
  from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

  config = DeformableDetrConfig(use_timm_backbone=True, backbone=cfg.backbone, use_pretrained_backbone=False,
                                encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                                num_queries=cfg.num_queries)
  torch.manual_seed(0)
  model = DeformableDetrForObjectDetection(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.01 * torch.randn_like(p))
  return config, model


def _inputs(cfg):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(cfg.batch, 3, cfg.size, cfg.size)).astype(np.float32)
  mask = np.ones((cfg.batch, cfg.size, cfg.size), np.int64)
  mask[-1, cfg.size * 3 // 4:] = 0  # the last image is padded at the bottom
  return x, mask


def run(cfg) -> dict:
  import torch
  import transformers

  from deformjax.convert.deformable_detr import from_deformable_detr

  config, model = _torch_model(cfg)
  x, mask = _inputs(cfg)
  tx, tmask = torch.from_numpy(x), torch.from_numpy(mask)
  detector = from_deformable_detr({k: v.numpy() for k, v in model.state_dict().items()}, config.to_dict())
  jx, jmask = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(mask)
  graphdef, params, rest = nnx.split(detector, nnx.Param, ...)

  def forward(params, x, m):
    out = nnx.merge(graphdef, params, rest)(x, m)
    return out.logits, out.pred_boxes

  def loss(params, x, m):
    logits, boxes = forward(params, x, m)
    return jnp.sum(jax.nn.sigmoid(logits)) + jnp.sum(boxes)

  ours_fwd, ours_bwd = jax.jit(forward), jax.jit(jax.value_and_grad(loss))

  def torch_fwd():
    with torch.no_grad():
      model(pixel_values=tx, pixel_mask=tmask)

  def torch_bwd():
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=tx, pixel_mask=tmask)
    (out.logits.sigmoid().sum() + out.pred_boxes.sum()).backward()

  cases = {'ours forward': jax_call(ours_fwd, params, jx, jmask), 'transformers forward': torch_fwd,
           'ours forward+backward': jax_call(ours_bwd, params, jx, jmask), 'transformers forward+backward': torch_bwd}
  ms = interleaved_ms(cases, rounds=cfg.rounds, per_round=1, warmup=1)
  return benchmark_metadata(torch=torch.__version__, transformers=transformers.__version__) | {
      'benchmark': 'deformable_detr',
      'method': (f'median of {cfg.rounds} interleaved runs after 1 warm-up each; ours jitted (compile excluded); '
                 f'torch threads {torch.get_num_threads()}; eval mode; loss sum(sigmoid(logits)) + sum(pred_boxes)'),
      'shapes': [f'batch {cfg.batch} at {cfg.size}x{cfg.size} (last image padded), {cfg.backbone}, '
                 f'{cfg.encoder_layers}+{cfg.decoder_layers} layers, {cfg.num_queries} queries, d_model 256'],
      'ms': ms,
      'speedup': {'forward': ms['transformers forward'] / ms['ours forward'],
                  'forward+backward': ms['transformers forward+backward'] / ms['ours forward+backward']},
  }


def markdown(result: dict) -> str:
  rows = [f"| {kind} | {result['ms']['ours ' + kind]:.0f} | {result['ms']['transformers ' + kind]:.0f} | "
          f"{result['speedup'][kind]:.2f}x |" for kind in ('forward', 'forward+backward')]
  return '\n'.join([
      '# Deformable DETR on CPU: ours beside transformers', '', benchmark_header(result), '',
      '| pass | ours (ms) | transformers (ms) | transformers / ours |', '|---|---|---|---|', *rows, ''])


def main(args=None):
  return bench_main(args, 'experiments.bench_deformable_detr', DEFAULT_CONFIG, run, markdown,
                    lambda cfg: 'bench_deformable_detr_cpu')


if __name__ == '__main__':
  main()
