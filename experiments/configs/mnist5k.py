"""5,000 real MNIST digits (4,000 to train, 1,000 to test), 5-conv classifier with the last two convs deformable,
at the MNIST study's settings (14 epochs of Adam 1e-3, StepLR(5 epochs, 0.7), batch 64).

  python -m deformjax.train --config experiments/configs/mnist5k.py
  python -m deformjax.train --config experiments/configs/mnist5k.py --config.deformable=none
  python -m deformjax.train --config experiments/configs/mnist5k.py:runlocal   # a few steps, for a smoke test
"""

from experiments.configs import digits


def get_config(arg: str | None = None):
  # The digits config's settings (14 epochs, batch 64, the same runlocal switch) on the real digits.
  c = digits.get_config(arg)
  c.dataset = 'mnist5k'
  return c
