"""The InternImage benchmark (`experiments/bench_internimage.py`): InternImage-T and FlashInternImage-T inference,
ours beside the reference PyTorch models.

  python -m experiments.bench_internimage --config.internimage_src=.../InternImage/classification \\
    --config.dcnv4_src=.../DCNv4 --config.batches=8,1 --config.torch_max_batch=1 --out experiments/results
  python -m experiments.bench_internimage --config=experiments/configs/bench_internimage.py:runlocal   # a smoke test

The sources default to the environment's DEFORMJAX_INTERNIMAGE_SRC and DEFORMJAX_DCNV4_SRC; a model whose source
is not given is skipped.
"""

import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: None, or `runlocal` (batch 1 at 32x32, one round: the T models still take a while to build)."""
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; choose runlocal or none')
  c = ml_collections.ConfigDict()
  c.internimage_src = os.environ.get('DEFORMJAX_INTERNIMAGE_SRC', '')  # InternImage's classification/ folder
  c.dcnv4_src = os.environ.get('DEFORMJAX_DCNV4_SRC', '')  # the root of a DCNv4 checkout
  c.batches = (8,)  # batch sizes; ours is timed at each
  c.torch_max_batch = 8  # time the PyTorch side only at batches up to this (its CPU DCN cores are slow)
  c.size = 224  # input height and width
  c.rounds = 3  # interleaved rounds, one run of each side per round
  if arg == 'runlocal':
    c.batches, c.size, c.rounds, c.torch_max_batch = (1,), 32, 1, 1
  return c
