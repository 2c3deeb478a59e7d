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
  DEFORMABLE_DETR_DEFAULTS,
  BackboneSpec,
  DeformableDetr,
  DeformableDetrDecoder,
  DeformableDetrDecoderLayer,
  DeformableDetrEncoder,
  DeformableDetrEncoderLayer,
  DeformableDetrEncoderOutput,
  DeformableDetrMLPHead,
  DeformableDetrOutput,
  DeformableDetrSelfAttention,
  PyramidBackbone,
  backbone_spec,
  downsample_mask,
  encoder_proposals,
  inverse_sigmoid,
  proposal_position_embedding,
  reference_points,
  sine_position_embedding,
  valid_ratios,
)
from deformjax.models.internimage import (
  FLASH_INTERNIMAGE_PRESETS,
  INTERNIMAGE_PRESETS,
  FlashInternImage,
  InternImage,
  InternImageConfig,
  resolve_config,
)
from deformjax.models.resnet import RESNET_PRESETS, FrozenBatchNorm, ResNet, ResNetBlock, resnet_preset

__all__ = ['CONVS', 'DEFORMABLE_DETR_DEFAULTS', 'FLASH_INTERNIMAGE_PRESETS', 'INTERNIMAGE_PRESETS', 'MODELS',
           'PRESET_MODELS', 'RESNET_PRESETS', 'BackboneSpec', 'CifarNet', 'ConvClassifier', 'DeformableDetr',
           'DeformableDetrDecoder', 'DeformableDetrDecoderLayer', 'DeformableDetrEncoder',
           'DeformableDetrEncoderLayer', 'DeformableDetrEncoderOutput', 'DeformableDetrMLPHead',
           'DeformableDetrOutput', 'DeformableDetrSelfAttention', 'FlashInternImage', 'FrozenBatchNorm', 'InternImage',
           'InternImageConfig', 'PyramidBackbone', 'ResNet', 'ResNetBlock', 'Residual', 'backbone_spec', 'build_model',
           'check_preset_model', 'downsample_mask', 'encoder_proposals', 'inverse_sigmoid',
           'proposal_position_embedding', 'reference_points', 'resnet_preset', 'resolve_config', 'resolve_conv',
           'resolve_deformable', 'sine_position_embedding', 'valid_ratios']
