"""Embedded digits (28x28), 5-conv classifier with the last two convs deformable.

  python -m deformjax.train --config experiments/configs/digits.py
  python -m deformjax.train --config experiments/configs/digits.py --config.deformable=none --config.epochs=5
  python -m deformjax.train --config experiments/configs/digits.py:runlocal   # 20 steps, a smoke test
"""

from deformjax.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.dataset = 'digits'
  c.epochs = 14
  c.batch_size = 64
  if arg == 'runlocal':
    c.steps = 20
    c.log_every = 5
  return c
