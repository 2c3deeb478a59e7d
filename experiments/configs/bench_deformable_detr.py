"""The Deformable DETR benchmark (`experiments/bench_deformable_detr.py`): the detector's forward and
forward + backward on CPU, ours beside transformers' `DeformableDetrForObjectDetection`.

  nice -n 10 python -m experiments.bench_deformable_detr --out experiments/results
  python -m experiments.bench_deformable_detr --config=experiments/configs/bench_deformable_detr.py:runlocal
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: None (transformers' default architecture: ResNet-50, 6 + 6 layers, 300 queries; batch 2 at 512x512),
  or `runlocal` (ResNet-18, 1 + 2 layers, 20 queries, batch 1 at 128x128, one round: a smoke test)."""
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; choose runlocal or none')
  c = ml_collections.ConfigDict()
  c.backbone = 'resnet50'
  c.encoder_layers = 6
  c.decoder_layers = 6
  c.num_queries = 300
  c.batch = 2
  c.size = 512  # input height and width
  c.rounds = 3  # interleaved rounds, one run of each case per round
  if arg == 'runlocal':
    c.backbone, c.encoder_layers, c.decoder_layers, c.num_queries = 'resnet18', 1, 2, 20
    c.batch, c.size, c.rounds = 1, 128, 1
  return c
