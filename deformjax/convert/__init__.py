"""Converters into deformjax modules, one module per source, every public converter importable from here.

- PyTorch: torchvision's `DeformConv2d` (`from_torchvision`); mmcv's DCN and deformable RoI pool packs
  (`from_mmcv`, `from_mmcv_deform_roi_pool`); OpenGVLab's DCNv3 / DCNv4 layers and InternImage / FlashInternImage
  models (`from_dcnv3`, `from_dcnv4`, `from_internimage`, `from_flash_internimage` and the inverse
  `to_internimage_state_dict`); transformers' Deformable DETR: the detector, its encoder and its attention layer
  (`from_deformable_detr`, `from_deformable_detr_encoder`, `from_deformable_detr_attention` and the inverses
  `to_deformable_detr_state_dict`, `to_deformable_detr_encoder_state_dict`).
- Flax: a trained `nnx.Conv` into a `DeformConv` (`from_conv`), a Linen model's parameters into its deformable
  twin's (`linen_params`).

Each `from_<upstream thing>` returns the deformjax counterpart, and each `to_<upstream thing>_state_dict` is its
inverse. State dicts are flat `{name: numpy array}` mappings (`{k: v.numpy() for k, v in sd.items()}`), so no
converter imports torch. Arguments carry the deformjax module's names (`strides`, `kernel_dilation`,
`feature_group_count`, ...), with the source's spelling also accepted; what the weights say (channels, groups) is
read from them.
"""

from deformjax.convert.deformable_detr import (
  from_deformable_detr,
  from_deformable_detr_attention,
  from_deformable_detr_encoder,
  to_deformable_detr_encoder_state_dict,
  to_deformable_detr_state_dict,
)
from deformjax.convert.flax import from_conv, linen_params
from deformjax.convert.internimage import (
  from_dcnv3,
  from_dcnv4,
  from_flash_internimage,
  from_internimage,
  state_entries,
  to_internimage_state_dict,
)
from deformjax.convert.mmcv import from_mmcv, from_mmcv_deform_roi_pool
from deformjax.convert.torchvision import from_torchvision

__all__ = ['from_conv', 'from_dcnv3', 'from_dcnv4', 'from_deformable_detr', 'from_deformable_detr_attention',
           'from_deformable_detr_encoder', 'from_flash_internimage', 'from_internimage', 'from_mmcv',
           'from_mmcv_deform_roi_pool', 'from_torchvision', 'linen_params', 'state_entries',
           'to_deformable_detr_encoder_state_dict', 'to_deformable_detr_state_dict', 'to_internimage_state_dict']
