"""InternImage and FlashInternImage from their official PyTorch checkpoints, and back.

An official checkpoint holds a `model` dict keyed by the reference modules' names
(`patch_embed.conv1.weight`, `levels.2.blocks.0.dcn.offset.weight`, `conv_head.1.0.running_mean`,
...). `from_internimage` / `from_flash_internimage` take it as numpy arrays
(`{k: v.numpy() for k, v in torch.load(path, map_location='cpu')['model'].items()}`) and return the
NNX model computing what the PyTorch one computes, for NHWC inputs (`x_nchw.permute(0, 2, 3, 1)`).
`to_internimage_state_dict` is the inverse: a `state_dict` the reference module loads with `strict=True`.

Layouts: an `nn.Linear` weight `[out, in]` becomes a kernel `[in, out]`; a `Conv2d` weight
`[out, in/groups, kh, kw]` becomes HWIO `[kh, kw, in/groups, out]`; LayerNorm weight / bias become
scale / bias; the head's BatchNorm running mean / var become `nnx.BatchNorm`'s `mean` / `var`
(used in inference, `train=False`). Its `num_batches_tracked` counter has no counterpart (flax's
BatchNorm uses a fixed momentum) and is accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.models.internimage import (
  FlashInternImage,
  InternImage,
  InternImageConfig,
  _InternImageBase,
  resolve_config,
)

# Entries every reference BatchNorm carries that have no parameter here.
_IGNORED_SUFFIXES = ('.num_batches_tracked',)
_Entry = tuple[str, nnx.Variable, str]  # (reference key, our variable, layout: 'linear' | 'conv' | 'same')


def _linear(key: str, m: nnx.Linear) -> Iterator[_Entry]:
  yield f'{key}.weight', m.kernel, 'linear'
  if m.bias is not None:
    yield f'{key}.bias', m.bias, 'same'


def _conv(key: str, m: nnx.Conv) -> Iterator[_Entry]:
  yield f'{key}.weight', m.kernel, 'conv'
  if m.bias is not None:
    yield f'{key}.bias', m.bias, 'same'


def _layer_norm(key: str, m: nnx.LayerNorm) -> Iterator[_Entry]:
  yield f'{key}.weight', m.scale, 'same'
  yield f'{key}.bias', m.bias, 'same'


def _batch_norm(key: str, m: nnx.BatchNorm) -> Iterator[_Entry]:
  yield f'{key}.weight', m.scale, 'same'
  yield f'{key}.bias', m.bias, 'same'
  yield f'{key}.running_mean', m.mean, 'same'
  yield f'{key}.running_var', m.var, 'same'


def _dcn(key: str, m: Any, core: str) -> Iterator[_Entry]:
  if core == 'dcnv3':  # ops_dcnv3/modules/dcnv3.py: dw_conv = Sequential(Conv2d, Sequential(to_last, LN), GELU)
    for name in ('input_proj', 'output_proj', 'offset', 'mask'):
      yield from _linear(f'{key}.{name}', getattr(m, name))
    yield from _conv(f'{key}.dw_conv.0', m.dw_conv)
    yield from _layer_norm(f'{key}.dw_conv.1.1', m.norm)
    return
  yield from _linear(f'{key}.offset_mask', m.offset_mask)  # DCNv4_op/DCNv4/modules/dcnv4.py
  if m.value_proj is not None:
    yield from _linear(f'{key}.value_proj', m.value_proj)
    yield from _linear(f'{key}.output_proj', m.output_proj)
  if m.offset_mask_dw is not None:
    yield from _conv(f'{key}.offset_mask_dw', m.offset_mask_dw)


def state_entries(model: InternImage | FlashInternImage) -> list[tuple[str, nnx.Variable, str]]:
  """Every parameter of `model` with its reference name and layout: `(key, variable, layout)`, layout 'linear'
  (`[out, in]` there), 'conv' (OIHW there) or 'same'.

  The reference wraps each norm in an `nn.Sequential` with permutes around it, hence the indices
  (`norm1.0`, `patch_embed.norm1.1`, `downsample.norm.1`, `conv_head.1.0`).

  Example:
    >>> from flax import nnx
    >>> from deformjax.models import InternImage, convert
    >>> model = nnx.eval_shape(lambda: InternImage('micro', rngs=nnx.Rngs(0)))
    >>> [key for key, _, _ in convert.state_entries(model)][:3]
    ['patch_embed.conv1.weight', 'patch_embed.conv1.bias', 'patch_embed.norm1.1.weight']
  """
  if not isinstance(model, _InternImageBase):
    raise TypeError(f'state_entries: model must be an InternImage or FlashInternImage, got {type(model).__name__}')
  out: list[_Entry] = []
  stem = model.patch_embed
  out += _conv('patch_embed.conv1', stem.conv1)
  out += _layer_norm('patch_embed.norm1.1', stem.norm1)  # Sequential(to_channels_last, LN, to_channels_first)
  out += _conv('patch_embed.conv2', stem.conv2)
  out += _layer_norm('patch_embed.norm2.1', stem.norm2)  # Sequential(to_channels_last, LN)
  for i, level in enumerate(model.levels):
    for j, block in enumerate(level.blocks):
      key = f'levels.{i}.blocks.{j}'
      out += _layer_norm(f'{key}.norm1.0', block.norm1)
      out += _dcn(f'{key}.dcn', block.dcn, model.core)
      out += _layer_norm(f'{key}.norm2.0', block.norm2)
      out += _linear(f'{key}.mlp.fc1', block.mlp.fc1)
      out += _linear(f'{key}.mlp.fc2', block.mlp.fc2)
      if block.gamma1 is not None:
        out += [(f'{key}.gamma1', block.gamma1, 'same'), (f'{key}.gamma2', block.gamma2, 'same')]
    if level.norm is not None:
      out += _layer_norm(f'levels.{i}.norm.0', level.norm)
    if level.downsample is not None:
      out += _conv(f'levels.{i}.downsample.conv', level.downsample.conv)
      out += _layer_norm(f'levels.{i}.downsample.norm.1', level.downsample.norm)
  out += _conv('conv_head.0', model.conv_head.conv)
  out += _batch_norm('conv_head.1.0', model.conv_head.bn)  # Sequential(BatchNorm2d) inside the head Sequential
  if model.head is not None:
    out += _linear('head', model.head)
  return out


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'linear':
    return value.T
  if layout == 'conv':
    return value.transpose(3, 2, 0, 1)
  return value


def _from_torch(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'linear':
    return value.T
  if layout == 'conv':
    return value.transpose(2, 3, 1, 0)
  return value


def to_internimage_state_dict(model: InternImage | FlashInternImage) -> dict[str, np.ndarray]:
  """`model`'s parameters as the reference module's `state_dict` (numpy, reference names and layouts).

  `torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` then computes what
  `model` computes; `from_internimage` / `from_flash_internimage` read it back.

  Example (a round trip; the model built abstractly and zero-filled, where a trained one would be used):
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from deformjax.models import FlashInternImage, convert
    >>> model = nnx.eval_shape(lambda: FlashInternImage('micro', num_classes=10, rngs=nnx.Rngs(0)))
    >>> nnx.update(model, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nnx.state(model)))
    >>> sd = convert.to_internimage_state_dict(model)
    >>> sd['levels.0.blocks.0.dcn.offset_mask.weight'].shape, sd['head.weight'].shape  # torch layouts
    ((32, 16), (10, 192))
    >>> back = convert.to_internimage_state_dict(convert.from_flash_internimage(sd, 'micro'))
    >>> all(np.array_equal(back[k], sd[k]) for k in sd)
    True
  """
  sd = {key: _to_torch(np.asarray(var[...]), layout) for key, var, layout in state_entries(model)}
  sd['conv_head.1.0.num_batches_tracked'] = np.zeros((), np.int64)
  return sd


def _load(cls: type[_InternImageBase], fn: str, state: Mapping[str, Any], preset: str | InternImageConfig,
          kw: dict[str, Any]) -> _InternImageBase:
  cfg = resolve_config(preset, cls.presets, f'{fn}: preset')
  if 'num_classes' not in kw:  # read from the checkpoint: 1000, 21841, ... or 0 (no head)
    kw['num_classes'] = int(np.shape(state['head.weight'])[0]) if 'head.weight' in state else 0
  # Abstract first (no random initialisation of weights that are overwritten), then every variable is set.
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kw))
  entries = state_entries(model)
  expected = {key for key, _, _ in entries}
  given = {k for k in state if not k.endswith(_IGNORED_SUFFIXES)}
  missing, unknown = sorted(expected - given), sorted(given - expected)
  if missing or unknown:
    raise ValueError(f'{fn}: the state dict does not match {cls.__name__} preset {preset!r} '
                     f'(num_classes={kw["num_classes"]}): missing keys {missing}; unknown keys {unknown}')
  for key, var, layout in entries:
    want = tuple(_to_torch(np.empty(var.shape, np.bool_), layout).shape)
    value = np.asarray(state[key])
    if value.shape != want:
      raise ValueError(f'{fn}: {key!r} has shape {value.shape}, expected {want} for {cls.__name__} preset '
                       f'{preset!r}')
    var.set_value(jnp.asarray(_from_torch(value, layout), var.dtype))
  left = [path for path, leaf in nnx.to_flat_state(nnx.state(model)) if isinstance(leaf[...], jax.ShapeDtypeStruct)]
  if left:  # a parameter without a reference name: a bug here, not in the checkpoint
    raise AssertionError(f'{fn}: no checkpoint entry mapped onto {left}')
  return model


def from_internimage(state_dict: Mapping[str, Any], preset: str | InternImageConfig, **kwargs: Any) -> InternImage:
  """An `InternImage` holding an official InternImage checkpoint (`classification/models/intern_image.py`).

  Args:
    state_dict: the checkpoint's `model` dict as numpy arrays, keyed by the reference names.
    preset: the checkpoint's configuration: 't', 's', 'b' or an `InternImageConfig`.
    **kwargs: `InternImage` options (`dtype`, `param_dtype`, `remat`, `precision`, `drop_path_rate`, ...);
      `num_classes` defaults to the checkpoint head's (0 when it has none).

  Returns:
    The model; `model(x_nhwc)` equals the reference's `model(x_nchw)` (in inference: BatchNorm
    running statistics, no drop path).

  Raises:
    ValueError: listing the missing and the unknown keys together, or naming a key whose shape is
      not the preset's (with both shapes).

  Example (what a checkpoint must hold; `to_internimage_state_dict` shows a round trip):
    >>> import numpy as np
    >>> from deformjax.models import convert
    >>> try:
    ...   convert.from_internimage({'head.weight': np.zeros((10, 192), np.float32)}, 'micro')
    ... except ValueError as e:
    ...   print(str(e)[:100])
    from_internimage: the state dict does not match InternImage preset 'micro' (num_classes=10): missing
  """
  return _load(InternImage, 'from_internimage', state_dict, preset, dict(kwargs))


def from_flash_internimage(state_dict: Mapping[str, Any], preset: str | InternImageConfig,
                           **kwargs: Any) -> FlashInternImage:
  """A `FlashInternImage` holding an official FlashInternImage checkpoint (DCNv4's
  `classification/models/flash_intern_image.py`); arguments, result and errors as `from_internimage`.

  Example:
    >>> import numpy as np
    >>> from deformjax.models import convert
    >>> try:  # FlashInternImage's MLP has no second bias
    ...   convert.from_flash_internimage({'levels.0.blocks.0.mlp.fc2.bias': np.zeros(16, np.float32)}, 'micro')
    ... except ValueError as e:
    ...   print(str(e).split('unknown keys ')[1])
    ['levels.0.blocks.0.mlp.fc2.bias']
  """
  return _load(FlashInternImage, 'from_flash_internimage', state_dict, preset, dict(kwargs))


__all__ = ['from_flash_internimage', 'from_internimage', 'state_entries', 'to_internimage_state_dict']
