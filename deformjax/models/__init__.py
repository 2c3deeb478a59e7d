"""Classifiers: the studies' small nets with a regular / deformable switch, and InternImage / FlashInternImage."""

from deformjax.models import convert
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
from deformjax.models.convert import (
  from_flash_internimage,
  from_internimage,
  state_entries,
  to_internimage_state_dict,
)
from deformjax.models.internimage import (
  FLASH_INTERNIMAGE_PRESETS,
  INTERNIMAGE_PRESETS,
  FlashInternImage,
  InternImage,
  InternImageConfig,
  resolve_config,
)

__all__ = ['CONVS', 'FLASH_INTERNIMAGE_PRESETS', 'INTERNIMAGE_PRESETS', 'MODELS', 'PRESET_MODELS', 'CifarNet',
           'ConvClassifier', 'FlashInternImage', 'InternImage', 'InternImageConfig', 'Residual', 'build_model',
           'check_preset_model', 'convert', 'from_flash_internimage', 'from_internimage', 'resolve_config', 'resolve_conv',
           'resolve_deformable', 'state_entries', 'to_internimage_state_dict']
