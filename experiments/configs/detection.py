"""Detection study: a small Deformable DETR trained from scratch on digit canvases, evaluated with COCO's AP.

  python -m experiments.detection                                               # the study (about 20 minutes)
  python -m experiments.detection --out experiments/results                     # refresh the committed results
  python -m experiments.detection --config experiments/configs/detection.py:runlocal   # smoke test (seconds)
  python -m experiments.detection --config.train.time_budget_s=600 --config.data.source=digits

The detector is transformers' `DeformableDetrConfig` as a dict (`detector`), with a four-stage ResNet of basic
blocks in transformers' layout, far narrower than ResNet-18, whose last three stages feed the encoder.
"""

import ml_collections


def detector_config(runlocal: bool = False) -> dict:
  """The Deformable DETR config (transformers' field names) the study trains."""
  width = 8 if runlocal else 16
  return {
      'backbone_config': {'model_type': 'resnet', 'embedding_size': width, 'hidden_sizes': [width, 2 * width,
                                                                                            4 * width, 8 * width],
                          'depths': [1, 1, 1, 1], 'layer_type': 'basic',
                          'out_features': ['stage1', 'stage2', 'stage3']},
      'use_timm_backbone': False, 'num_labels': 10, 'd_model': 32 if runlocal else 64,
      'encoder_layers': 1, 'decoder_layers': 2,
      'encoder_attention_heads': 4, 'decoder_attention_heads': 4, 'encoder_ffn_dim': 64 if runlocal else 128,
      'decoder_ffn_dim': 64 if runlocal else 128, 'encoder_n_points': 4, 'decoder_n_points': 4,
      'num_feature_levels': 3, 'num_queries': 8 if runlocal else 12, 'with_box_refine': True, 'two_stage': False,
      'dropout': 0.0, 'auxiliary_loss': True,
      # transformers' matcher and loss weights
      'class_cost': 1, 'bbox_cost': 5, 'giou_cost': 2, 'focal_alpha': 0.25, 'bbox_loss_coefficient': 5,
      'giou_loss_coefficient': 2,
  }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study's config; `arg == 'runlocal'` shrinks everything to a smoke test of a few steps."""
  runlocal = arg == 'runlocal'
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f"detection config: the argument is '' or 'runlocal', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.name = 'detection_canvas'
  c.seed = 0
  c.data = ml_collections.ConfigDict({
      'source': 'digits' if runlocal else 'mnist5k', 'size': 48, 'num_digits': (1, 3), 'digit_size': (12, 20),
      'max_overlap': 0.1, 'train_images': 16 if runlocal else 6000, 'test_images': 8 if runlocal else 500})
  c.detector = detector_config(runlocal)
  c.encoder_loss = False  # the two-stage encoder terms (only with detector.two_stage)
  c.train = ml_collections.ConfigDict({
      'batch_size': 4 if runlocal else 16, 'learning_rate': 1e-3, 'weight_decay': 1e-4, 'grad_clip': 0.1,
      'warmup_steps': 1 if runlocal else 50, 'max_steps': 2 if runlocal else 1_000_000,
      # Training stops after this many seconds of wall time (compilation included); the learning rate drops
      # tenfold for the last `decay_fraction` of it.
      'time_budget_s': 3600.0 if runlocal else 1020.0, 'decay_fraction': 0.2, 'log_every': 1 if runlocal else 50})
  c.eval = ml_collections.ConfigDict({'batch_size': 4 if runlocal else 50, 'threshold': 0.0, 'top_k': 100,
                                      'plot_images': 2 if runlocal else 8, 'plot_threshold': 0.5})
  return c
