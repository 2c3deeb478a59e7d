"""The op benchmark (`experiments/bench_ops.py`): deform_conv2d against lax.conv, or the deformable family.

  python -m experiments.bench_ops                                                  # deform_conv2d
  python -m experiments.bench_ops --config=experiments/configs/bench_ops.py:family  # dcnv3 / dcnv4 / ms_deform_attn
  python -m experiments.bench_ops --config=experiments/configs/bench_ops.py:runlocal         # smoke tests, seconds
  python -m experiments.bench_ops --config=experiments/configs/bench_ops.py:family,runlocal
"""

import ml_collections
from ml_collections import config_dict

# DCNv4's operator shapes (N, H=W, groups, C) and Deformable DETR's encoder (batch 2, a 512x512 image's levels
# 64x64 ... 8x8, 8 heads of 32, 4 points, every pixel a query).
FAMILY_DCN_SHAPES = ((64, 56, 4, 128), (64, 28, 8, 256), (64, 14, 16, 512), (64, 7, 32, 1024))
FAMILY_MSDA = {'n': 2, 'levels': ((64, 64), (32, 32), (16, 16), (8, 8)), 'heads': 8, 'd': 32, 'points': 4}
ARGS = ('family', 'runlocal')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: comma-separated words of `ARGS` (`family`: the family benchmark; `runlocal`: tiny shapes, few runs)."""
  words = {w for w in (arg or '').split(',') if w}
  if unknown := sorted(words - set(ARGS)):
    raise ValueError(f"unknown config argument {', '.join(unknown)}; choose from {', '.join(ARGS)}")
  c = ml_collections.ConfigDict()
  c.family = 'family' in words
  c.repeats = 20  # timed runs per case, split over the rounds
  c.rounds = 3  # interleaved timing rounds
  c.torchvision = True  # time torchvision (the family: the PyTorch references) where it imports
  c.tag = ''  # the file name's suffix; '' names it after the platform (cpu / gpu / tpu) and a non-float32 dtype
  # deform_conv2d: (N, H=W, C_in=C_out) triples, () for the platform's defaults (see experiments/bench_ops.py).
  c.shapes = ()
  c.dtype = 'float32'  # float32, bfloat16 or float16
  c.chunk_size = config_dict.placeholder(int)
  c.baseline = config_dict.placeholder(str)  # a git revision whose deform_conv2d is timed side by side
  c.deterministic_gradients = False  # also time forward+backward with deterministic gradients
  c.precision = config_dict.placeholder(str)  # default, high or highest (None: JAX's default, TF32 on NVIDIA GPUs)
  # The family: its shapes, and the batch sizes that shrink them for a small CPU (None: the shapes' own).
  c.family_shapes = FAMILY_DCN_SHAPES
  c.msda = ml_collections.ConfigDict(FAMILY_MSDA)
  c.batch = config_dict.placeholder(int)
  c.msda_batch = config_dict.placeholder(int)
  if 'runlocal' in words:
    c.repeats, c.rounds = 2, 1
    c.shapes = ((2, 6, 4),)
    c.family_shapes = ((1, 6, 2, 8),)
    c.msda = ml_collections.ConfigDict({'n': 1, 'levels': ((6, 6), (3, 3)), 'heads': 2, 'd': 4, 'points': 2})
  return c
