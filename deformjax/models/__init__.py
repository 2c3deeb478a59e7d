"""Small classifiers with a regular / deformable switch."""

from deformjax.models.classifiers import MODELS, CifarNet, ConvClassifier, build_model, resolve_deformable

__all__ = ['MODELS', 'CifarNet', 'ConvClassifier', 'build_model', 'resolve_deformable']
