"""Detection: a small Deformable DETR trained from scratch on canvases of real MNIST digits, scored by COCO's AP.

  python -m deformjax.train --config experiments/configs/detection.py                  # train and evaluate
  python -m deformjax.train --config experiments/configs/detection.py:runlocal         # a smoke test (seconds)
  python -m deformjax.train --config experiments/configs/detection.py --config.workdir=/tmp/det   # resumable
  python -m experiments.detection                         # the same run, plus the study's results and picture

The detector is `config.detector` (transformers' `DeformableDetrConfig` fields; see
`deformjax.train.config.detector_config`): a four-stage ResNet of basic blocks in transformers' layout, far
narrower than ResNet-18, whose last three stages feed the encoder; one encoder and two decoder layers, 12 queries,
iterative box refinement. Training follows Deformable DETR's recipe at a small scale: AdamW (weight decay 1e-4),
gradient clipping at a global norm of 0.1, a tenfold learning-rate drop for the last fifth of training.
"""

from deformjax.train.config import base_config, canvas_config, detector_config


def get_config(arg: str | None = None):
  """The run; `arg == 'runlocal'` shrinks data, detector and run to a smoke test of two steps."""
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f"detection config: the argument is '' or 'runlocal', got {arg!r}")
  c = base_config()
  c.task, c.model, c.dataset = 'detection', 'deformable_detr', 'mnist5k'
  c.detector = detector_config()
  c.canvas = canvas_config(size=48, num_digits=(1, 3), digit_size=(12, 20), train_images=6000, test_images=500)
  c.optimizer, c.learning_rate, c.weight_decay, c.grad_clip, c.warmup_steps = 'adamw', 1e-3, 1e-4, 0.1, 50
  c.batch_size, c.epochs = 16, 20
  c.schedule, c.step_epochs, c.step_gamma = 'step', 16, 0.1
  c.eval_batch_size, c.eval_every_epochs, c.log_every = 100, 2, 50
  if arg == 'runlocal':
    width = 8
    c.dataset = 'digits'
    c.detector = detector_config(
        backbone_config=dict(c.detector.backbone_config.to_dict(), embedding_size=width,
                             hidden_sizes=[width, 2 * width, 4 * width, 8 * width]),
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=8)
    c.canvas = canvas_config(train_images=16, test_images=8)
    c.batch_size, c.eval_batch_size, c.steps, c.warmup_steps, c.log_every, c.eval_every_epochs = 8, 8, 2, 1, 1, 0
  return c
