"""Classifiers: the studies' small nets with a regular / deformable switch, and InternImage / FlashInternImage;
the Deformable DETR detector and its ResNet backbones."""

from deformjax.models.classifiers import (
  CONVS,
  MODELS,
  PRESET_MODELS,
  CifarNet,
  ConvClassifier,
  Residual,
  build_model,
  check_preset_model,
  resolve_conv,
  resolve_deformable,
)
from deformjax.models.deformable_detr import (
  DeformableDetr,
  DeformableDetrEncoder,
  DeformableDetrEncoderLayer,
  DeformableDetrEncoderOutput,
  DeformableDetrOutput,
  PyramidBackbone,
)
from deformjax.models.internimage import (
  FLASH_INTERNIMAGE_PRESETS,
  INTERNIMAGE_PRESETS,
  FlashInternImage,
  InternImage,
  InternImageConfig,
  resolve_config,
)
from deformjax.models.resnet import RESNET_PRESETS, FrozenBatchNorm, ResNet, resnet_preset

__all__ = ['CONVS', 'FLASH_INTERNIMAGE_PRESETS', 'INTERNIMAGE_PRESETS', 'MODELS', 'PRESET_MODELS', 'RESNET_PRESETS',
           'CifarNet', 'ConvClassifier', 'DeformableDetr', 'DeformableDetrEncoder', 'DeformableDetrEncoderLayer',
           'DeformableDetrEncoderOutput', 'DeformableDetrOutput', 'FrozenBatchNorm', 'PyramidBackbone', 'ResNet',
           'FlashInternImage', 'InternImage', 'InternImageConfig', 'Residual', 'build_model',
           'check_preset_model', 'resnet_preset', 'resolve_config', 'resolve_conv', 'resolve_deformable']
