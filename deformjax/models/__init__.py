"""Small classifiers with a regular / deformable switch."""

from deformjax.models.classifiers import (
  CONVS,
  MODELS,
  CifarNet,
  ConvClassifier,
  Residual,
  build_model,
  resolve_conv,
  resolve_deformable,
)

__all__ = ['CONVS', 'MODELS', 'CifarNet', 'ConvClassifier', 'Residual', 'build_model', 'resolve_conv',
           'resolve_deformable']
