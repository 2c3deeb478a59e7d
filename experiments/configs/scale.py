"""Study 2, scale robustness: train at scale 1, test with the digits scaled by
0.5, 0.6, ..., 1.5; plus the effective dilation of the deformable layers against scale.

  python -m experiments.scale
  python -m experiments.scale --config experiments/configs/scale.py:mnist5k   # 5,000 real MNIST digits
  python -m experiments.scale --config experiments/configs/scale.py:mnist
  python -m experiments.scale --config experiments/configs/scale.py:runlocal   # or mnist5k,runlocal
"""

import ml_collections
import numpy as np

from deformjax.train.config import augment_config, base_config
from experiments.configs.robustness import parse_arg


def scale_key(s: float) -> str:
  """Eval-set name of a test scale (ConfigDict keys cannot hold dots): 0.5 -> 'scale_050'."""
  return f'scale_{int(round(100 * s)):03d}'


def get_config(arg: str | None = None):
  dataset, runlocal = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.name = f'scale_{dataset}'
  c.seeds = (0, 1, 2)
  c.scales = tuple(float(s) for s in np.round(np.arange(0.5, 1.51, 0.1), 2))
  c.train = base_config()
  c.train.dataset = dataset
  c.train.progress = False
  c.train.epochs = 20 if dataset == 'digits' else 14
  c.train.eval_sets = ml_collections.ConfigDict({scale_key(s): augment_config(scale_range=(s, s))
                                                 for s in c.scales})
  c.variants = ml_collections.ConfigDict({'regular': 'none', 'deformable': '3'})
  c.variant_order = ('regular', 'deformable')
  c.reference = {'regular': 91.10, 'deformable': 94.11}  # the original study, MNIST, mean over scales
  c.dilation_images = 128  # test images per scale for the effective-dilation analysis
  if runlocal:
    c.name += '_runlocal' if dataset != 'digits' else ''
    c.seeds = (0,)
    c.scales = (0.5, 1.0, 1.5)
    c.train.eval_sets = ml_collections.ConfigDict({scale_key(s): augment_config(scale_range=(s, s))
                                                   for s in c.scales})
    c.train.steps = 10
    c.dilation_images = 8
  return c
