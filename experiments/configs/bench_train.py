"""The training-step benchmark (`experiments/bench_train.py`): the training loop against its ideal step.

  python -m experiments.bench_train                                                    # CPU: a few minutes
  python -m experiments.bench_train --config.steps=200 --config.rounds=5               # on a GPU
  python -m experiments.bench_train --config.settings=regular,modulated --config.torch=False
  python -m experiments.bench_train --config=experiments/configs/bench_train.py:runlocal   # a smoke test
"""

import ml_collections

MODELS = ('conv5', 'cifarnet')  # conv5 on the embedded digits, cifarnet on random CIFAR-shaped data
SETTINGS = ('regular', 'deformable', 'modulated')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: None, or `runlocal` (one model, two settings, two steps, no PyTorch nets: seconds)."""
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; choose runlocal or none')
  c = ml_collections.ConfigDict()
  c.models = MODELS  # of MODELS; comma-separated on the command line
  c.settings = SETTINGS  # of SETTINGS; comma-separated on the command line
  c.steps = 30  # timed steps per repeat
  c.rounds = 3  # interleaved repeats
  c.batch_size = 64  # global batch size
  c.examples = 4096  # CIFAR-shaped training examples
  c.torch = True  # time the original study's PyTorch nets where torch and torchvision import
  if arg == 'runlocal':
    c.models, c.settings = ('cifarnet',), ('regular', 'modulated')
    c.steps, c.rounds, c.batch_size, c.examples, c.torch = 2, 1, 16, 64, False
  return c
