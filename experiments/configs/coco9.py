"""Study 4: COCO 2017 as 9-class multi-label classification (bicycle, car, cat,
chair, cow, dog, horse, person, sheep), the COCO study's 5-conv net with
dropout 0.2 and BCE, Adam 1e-3, StepLR(3 epochs, 0.8), batch 128, 224x224.

Needs COCO prepared with TFDS once (tfds build coco/2017 --data_dir DIR, with
network and TensorFlow); reading it afterwards needs neither.

  python -m experiments.coco --data_dir DIR
  python -m deformjax.train --config experiments/configs/coco9.py --config.data_dir=DIR
  python -m deformjax.train --config experiments/configs/coco9.py:runlocal --config.data_dir=DIR   # 4 steps of 8
"""

from deformjax.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.dataset = 'coco9'
  c.model = 'conv5'
  c.dropout = 0.2
  c.learning_rate = 1e-3
  c.schedule = 'step'
  c.step_epochs = 3
  c.step_gamma = 0.8
  c.epochs = 10
  c.batch_size = 128
  c.eval_batch_size = 128
  c.log_every = 20
  if arg == 'runlocal':
    c.steps = 4
    c.batch_size = 8
    c.eval_batch_size = 8
  return c
