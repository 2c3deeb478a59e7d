"""InternImage and FlashInternImage (OpenGVLab) and their DCNv3 / DCNv4 layers, from PyTorch state dicts and back.

An official checkpoint holds a `model` dict keyed by the reference modules' names (`patch_embed.conv1.weight`,
`levels.2.blocks.0.dcn.offset.weight`, `conv_head.1.0.running_mean`, ...). `from_internimage` /
`from_flash_internimage` take it as numpy arrays (`{k: v.numpy() for k, v in torch.load(path,
map_location='cpu')['model'].items()}`) and return the NNX model computing what the PyTorch one computes, for NHWC
inputs (`x_nchw.permute(0, 2, 3, 1)`); `to_internimage_state_dict` is the inverse. `from_dcnv3` / `from_dcnv4`
load one DCN layer. One table, `state_entries`, names every parameter with its reference key and layout; the
loaders and the inverse all read it.

Layouts: an `nn.Linear` weight `[out, in]` becomes a kernel `[in, out]`; a `Conv2d` weight `[out, in/groups, kh,
kw]` becomes HWIO `[kh, kw, in/groups, out]`; LayerNorm weight / bias become scale / bias; the head's BatchNorm
running mean / var become `nnx.BatchNorm`'s `mean` / `var` (used in inference). Its `num_batches_tracked` counter
has no counterpart (flax's BatchNorm uses a fixed momentum) and is accepted and ignored. `DCNv3`, `DCNv4` keep
their references' (x, y) offset order, tap order and packed channels, so no weight is re-laid out beyond that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from deformjax.convert import _state
from deformjax.convert._state import Entry, conv_entries, join, linear_entries, norm_entries
from deformjax.models.internimage import (
  FlashInternImage,
  InternImage,
  InternImageConfig,
  _InternImageBase,
  resolve_config,
)
from deformjax.nn.dcnv3 import DCNv3
from deformjax.nn.dcnv4 import DCNv4
from deformjax.ops.dcnv4 import offset_mask_channels

# The model a loader builds: its class given, its instance returned.
_Model = TypeVar('_Model', InternImage, FlashInternImage)
# Entries every reference BatchNorm carries that have no parameter here.
_IGNORED_SUFFIXES = ('.num_batches_tracked',)


def _center_feature_scale(key: str, m: DCNv3 | DCNv4) -> Iterator[Entry]:
  """`center_feature_scale_proj_{weight, bias}`: bare parameters `[groups, C]`, `[groups]`, not an `nn.Linear`."""
  if m.center_feature_scale_proj is not None:
    yield join(key, 'center_feature_scale_proj_weight'), m.center_feature_scale_proj.kernel, 'linear'
    yield (join(key, 'center_feature_scale_proj_bias'),
           _state.present(m.center_feature_scale_proj.bias, join(key, 'center_feature_scale_proj_bias')), 'same')


def _dcnv3_entries(key: str, m: DCNv3) -> Iterator[Entry]:
  """InternImage's `DCNv3` (`ops_dcnv3/modules/dcnv3.py`): `dw_conv = Sequential(Conv2d, Sequential(to_last, LN),
  GELU)`, four `nn.Linear`s and the optional centre feature scale."""
  for name in ('input_proj', 'output_proj', 'offset', 'mask'):
    yield from linear_entries(join(key, name), getattr(m, name))
  yield from conv_entries(join(key, 'dw_conv.0'), m.dw_conv)
  yield from norm_entries(join(key, 'dw_conv.1.1'), m.norm)
  yield from _center_feature_scale(key, m)


def _dcnv4_entries(key: str, m: DCNv4) -> Iterator[Entry]:
  """OpenGVLab's `DCNv4` (`DCNv4_op/DCNv4/modules/dcnv4.py`)."""
  yield from linear_entries(join(key, 'offset_mask'), m.offset_mask)
  if m.value_proj is not None:
    assert m.output_proj is not None  # built with value_proj
    yield from linear_entries(join(key, 'value_proj'), m.value_proj)
    yield from linear_entries(join(key, 'output_proj'), m.output_proj)
  if m.offset_mask_dw is not None:
    yield from conv_entries(join(key, 'offset_mask_dw'), m.offset_mask_dw)
  yield from _center_feature_scale(key, m)


def _level_entries(i: int, level: Any, core: str) -> Iterator[Entry]:
  for j, block in enumerate(level.blocks):
    key = f'levels.{i}.blocks.{j}'
    yield from norm_entries(f'{key}.norm1.0', block.norm1)
    yield from (_dcnv3_entries if core == 'dcnv3' else _dcnv4_entries)(f'{key}.dcn', block.dcn)
    yield from norm_entries(f'{key}.norm2.0', block.norm2)
    yield from linear_entries(f'{key}.mlp.fc1', block.mlp.fc1)
    yield from linear_entries(f'{key}.mlp.fc2', block.mlp.fc2)
    if block.gamma1 is not None:
      yield f'{key}.gamma1', block.gamma1, 'same'
      yield f'{key}.gamma2', block.gamma2, 'same'
  if level.norm is not None:
    yield from norm_entries(f'levels.{i}.norm.0', level.norm)
  if level.downsample is not None:
    yield from conv_entries(f'levels.{i}.downsample.conv', level.downsample.conv)
    yield from norm_entries(f'levels.{i}.downsample.norm.1', level.downsample.norm)


def state_entries(model: InternImage | FlashInternImage) -> list[tuple[str, nnx.Variable, str]]:
  """Every parameter of an InternImage or FlashInternImage with its reference name and layout.

  The reference wraps each norm in an `nn.Sequential` with permutes around it, hence the indices (`norm1.0`,
  `patch_embed.norm1.1`, `downsample.norm.1`, `conv_head.1.0`).

  Args:
    model: an `InternImage` or `FlashInternImage`, also one built abstract (`nnx.eval_shape`).

  Returns:
    `[(key, variable, layout)]`, layout 'linear' (`[out, in]` there), 'conv' (OIHW there) or 'same'.

  Example:
    >>> from flax import nnx
    >>> from deformjax.convert import state_entries
    >>> from deformjax.models import InternImage
    >>> model = nnx.eval_shape(lambda: InternImage('micro', rngs=nnx.Rngs(0)))
    >>> [key for key, _, _ in state_entries(model)][:3]
    ['patch_embed.conv1.weight', 'patch_embed.conv1.bias', 'patch_embed.norm1.1.weight']
  """
  if not isinstance(model, _InternImageBase):
    raise TypeError(f'state_entries: model must be an InternImage or FlashInternImage, got {type(model).__name__}')
  stem = model.patch_embed
  out = [*conv_entries('patch_embed.conv1', stem.conv1),
         *norm_entries('patch_embed.norm1.1', stem.norm1),  # Sequential(to_channels_last, LN, to_channels_first)
         *conv_entries('patch_embed.conv2', stem.conv2),
         *norm_entries('patch_embed.norm2.1', stem.norm2)]  # Sequential(to_channels_last, LN)
  for i, level in enumerate(model.levels):
    out += _level_entries(i, level, model.core)
  out += conv_entries('conv_head.0', model.conv_head.conv)
  out += norm_entries('conv_head.1.0', model.conv_head.bn)  # Sequential(BatchNorm2d) inside the head Sequential
  if model.head is not None:
    out += linear_entries('head', model.head)
  return out


def to_internimage_state_dict(model: InternImage | FlashInternImage) -> dict[str, np.ndarray]:
  """`model`'s parameters as the reference module's `state_dict` (numpy, reference names and layouts).

  `torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` then computes what `model`
  computes; `from_internimage` / `from_flash_internimage` read it back.

  Args:
    model: an `InternImage` or `FlashInternImage`.

  Returns:
    `{key: array}` with every entry the reference's `strict=True` load needs.

  Example (a round trip; the model built abstractly and zero-filled, where a trained one would be used):
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from deformjax.convert import from_flash_internimage, to_internimage_state_dict
    >>> from deformjax.models import FlashInternImage
    >>> model = nnx.eval_shape(lambda: FlashInternImage('micro', num_classes=10, rngs=nnx.Rngs(0)))
    >>> nnx.update(model, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nnx.state(model)))
    >>> sd = to_internimage_state_dict(model)
    >>> sd['levels.0.blocks.0.dcn.offset_mask.weight'].shape, sd['head.weight'].shape  # torch layouts
    ((32, 16), (10, 192))
    >>> back = to_internimage_state_dict(from_flash_internimage(sd, 'micro'))
    >>> all(np.array_equal(back[k], sd[k]) for k in sd)
    True
  """
  sd = {key: _state.to_torch(np.asarray(var[...]), layout) for key, var, layout in state_entries(model)}
  sd['conv_head.1.0.num_batches_tracked'] = np.zeros((), np.int64)
  return sd


def _check_keys(state: Mapping[str, Any], prefix: str, entries: list[Entry], fn: str, what: str) -> None:
  """Refuses a state whose keys under `prefix` are not exactly the entries', listing the missing and the unknown."""
  expected = {prefix + key for key, _, _ in entries}
  given = {k for k in state if k.startswith(prefix) and not k.endswith(_IGNORED_SUFFIXES)}
  missing, unknown = sorted(expected - given), sorted(given - expected)
  if missing or unknown:
    first = missing[0][len(prefix):] if missing else ''
    hint = _state.prefix_hint(state, prefix, first) if missing and not given & expected else ''
    raise ValueError(f'{fn}: the state dict does not match {what}{hint}: missing keys {missing}; unknown keys '
                     f'{unknown}')


def _load(cls: type[_Model], fn: str, state: Mapping[str, Any], preset: str | InternImageConfig,
          prefix: str, kw: dict[str, Any]) -> _Model:
  state = _state.check_state(state, fn)
  cfg = resolve_config(preset, cls.presets, f'{fn}: preset')
  if 'num_classes' not in kw:  # read from the checkpoint: 1000, 21841, ... or 0 (no head)
    head = prefix + 'head.weight'
    kw['num_classes'] = int(np.shape(state[head])[0]) if head in state else 0
  # Abstract first (no random initialisation of weights that are overwritten), then every variable is set.
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kw))
  entries = state_entries(model)
  _check_keys(state, prefix, entries, fn, f'{cls.__name__} preset {preset!r} (num_classes={kw["num_classes"]})')
  for key, var, layout in entries:
    want = _state.to_torch(tuple(var.shape), layout)
    value = np.asarray(state[prefix + key])
    if value.shape != want:
      raise ValueError(f'{fn}: {prefix + key!r} has shape {value.shape}, expected {want} for {cls.__name__} preset '
                       f'{preset!r}')
    var.set_value(jnp.asarray(_state.from_torch(value, layout), var.dtype))
  left = [path for path, leaf in nnx.to_flat_state(nnx.state(model)) if isinstance(leaf[...], jax.ShapeDtypeStruct)]
  if left:  # a parameter without a reference name: a bug here, not in the checkpoint
    raise AssertionError(f'{fn}: no checkpoint entry mapped onto {left}')
  return model


def from_internimage(state_dict: Mapping[str, Any], preset: str | InternImageConfig, *, prefix: str = '',
                     **kwargs: Any) -> InternImage:
  """An `InternImage` holding an official InternImage checkpoint (`classification/models/intern_image.py`).

  Args:
    state_dict: the checkpoint's `model` dict as numpy arrays, keyed by the reference names.
    preset: the checkpoint's configuration: 't', 's', 'b' or an `InternImageConfig`.
    prefix: the model's prefix in `state_dict` (`'module.'` for a DataParallel one); other keys are ignored.
    **kwargs: `InternImage` options (`dtype`, `param_dtype`, `remat`, `precision`, `drop_path_rate`, ...);
      `num_classes` defaults to the checkpoint head's (0 when it has none).

  Returns:
    The model; `model(x_nhwc)` equals the reference's `model(x_nchw)` (in inference: BatchNorm running
    statistics, no drop path).

  Raises:
    ValueError: listing the missing and the unknown keys together (naming the `prefix=` to pass when the keys
      carry one), naming a key whose shape is not the preset's, or a checkpoint passed whole (`pass state['model']`).

  Example (what a checkpoint must hold; `to_internimage_state_dict` shows a round trip):
    >>> import numpy as np
    >>> from deformjax.convert import from_internimage
    >>> try:
    ...   from_internimage({'head.weight': np.zeros((10, 192), np.float32)}, 'micro')
    ... except ValueError as e:
    ...   print(str(e)[:100])
    from_internimage: the state dict does not match InternImage preset 'micro' (num_classes=10): missing
  """
  return _load(InternImage, 'from_internimage', state_dict, preset, prefix, dict(kwargs))


def from_flash_internimage(state_dict: Mapping[str, Any], preset: str | InternImageConfig, *, prefix: str = '',
                           **kwargs: Any) -> FlashInternImage:
  """A `FlashInternImage` holding an official FlashInternImage checkpoint (DCNv4's
  `classification/models/flash_intern_image.py`); arguments, result and errors as `from_internimage`.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert import from_flash_internimage
    >>> try:  # FlashInternImage's MLP has no second bias
    ...   from_flash_internimage({'levels.0.blocks.0.mlp.fc2.bias': np.zeros(16, np.float32)}, 'micro')
    ... except ValueError as e:
    ...   print(str(e).split('unknown keys ')[1])
    ['levels.0.blocks.0.mlp.fc2.bias']
  """
  return _load(FlashInternImage, 'from_flash_internimage', state_dict, preset, prefix, dict(kwargs))


def _taps(kernel_size: int, remove_center: bool) -> int:
  return kernel_size * kernel_size - bool(remove_center)


def _dw_kernel_size(s: _state.StateReader, key: str) -> int | None:
  """The side of the depthwise `Conv2d` weight `key [C, 1, k, k]`, or None when absent or not so shaped (the load
  then names it)."""
  shape: tuple[int, ...] = np.shape(s.state[s.prefix + key]) if s.has(key) else ()
  return int(shape[3]) if len(shape) == 4 and shape[2] == shape[3] else None


def _spellings(groups, group, padding, pad, kernel_dilation, dilation, fn: str) -> tuple[Any, Any, Any]:
  """`(groups, padding, kernel_dilation)`, each given under the module's name or the reference's."""
  return (_state.one_of(groups, group, ('groups', 'group'), None, fn),
          _state.one_of(padding, pad, ('padding', 'pad'), None, fn),
          _state.one_of(kernel_dilation, dilation, ('kernel_dilation', 'dilation'), 1, fn))


def _loaded(layer: DCNv3 | DCNv4, s: _state.StateReader, entries: Iterator[Entry]) -> Any:
  """`layer`, built abstract, with every entry loaded and nothing under the prefix left over."""
  s.load(entries)
  s.check_all_used(hint='check groups, kernel_size, remove_center and the prefix')
  _state.check_concrete(layer, s.fn)
  return layer


def _dcnv3_groups(s: _state.StateReader, groups: int | None, taps: int, fn: str) -> int:
  """`groups` as given, or read from `mask.weight [groups*taps, C]`."""
  if groups is not None:
    return groups
  rows, _ = s.linear_shape('mask.weight')
  if rows % taps:
    raise ValueError(f'{fn}: {s.prefix}mask.weight predicts {rows} mask values, not a multiple of {taps} taps: '
                     'check kernel_size and remove_center, or pass groups=')
  return rows // taps


def from_dcnv3(state: Mapping[str, np.ndarray], *, groups: int | None = None, kernel_size: int = 3,
               padding: int | None = None, kernel_dilation: int | None = None, offset_scale: float = 1.0,
               remove_center: bool = False, prefix: str = '', param_dtype: DTypeLike = np.float32,
               group: int | None = None, pad: int | None = None, dilation: int | None = None,
               **module_kwargs: Any) -> DCNv3:
  """A `DCNv3` reproducing InternImage's `DCNv3` / `DCNv3_pytorch` module (`ops_dcnv3/modules/dcnv3.py`).

  Each argument takes `DCNv3`'s name or InternImage's (`group`, `pad`, `dilation`), not both. `channels`,
  `dw_kernel_size`, `center_feature_scale` and (when not given) `groups` are read from the weights. Only the
  LayerNorm / GELU offset branch (the reference's default) is supported.

  Args:
    state: the module's `state_dict()` as numpy arrays: `input_proj`, `output_proj`, `offset`, `mask`
      (`nn.Linear`s), `dw_conv.0` (the depthwise conv), `dw_conv.1.1` (its LayerNorm) and, with
      `center_feature_scale`, `center_feature_scale_proj_{weight, bias}`; under `prefix`.
    groups: the channel groups (InternImage: `group`; read from `mask.weight` when None).
    kernel_size: the sampling grid's side.
    padding: the padding (InternImage: `pad`; None: `DCNv3`'s default).
    kernel_dilation: the tap spacing (InternImage: `dilation`; default 1).
    offset_scale: the offsets' scale.
    remove_center: whether the centre tap is dropped.
    prefix: the module's prefix in `state`, e.g. `'levels.2.blocks.0.dcn.'` for a whole InternImage.
    param_dtype: the parameters' dtype.
    group: InternImage's name for `groups`.
    pad: InternImage's name for `padding`.
    dilation: InternImage's name for `kernel_dilation`.
    **module_kwargs: `DCNv3` options a checkpoint does not hold (`dtype`, `precision`, `chunk_size`, ...).

  Returns:
    A `DCNv3` whose output equals the PyTorch module's for the same NHWC input.

  Raises:
    ValueError: naming a missing (with the `prefix=` to pass), wrongly shaped or unused entry.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert import from_dcnv3
    >>> c, g, rng = 16, 4, np.random.default_rng(0)
    >>> state = {'input_proj.weight': rng.normal(size=(c, c)), 'input_proj.bias': np.zeros(c),
    ...          'output_proj.weight': rng.normal(size=(c, c)), 'output_proj.bias': np.zeros(c),
    ...          'dw_conv.0.weight': rng.normal(size=(c, 1, 3, 3)), 'dw_conv.0.bias': np.zeros(c),
    ...          'dw_conv.1.1.weight': np.ones(c), 'dw_conv.1.1.bias': np.zeros(c),
    ...          'offset.weight': np.zeros((g * 18, c)), 'offset.bias': np.zeros(g * 18),
    ...          'mask.weight': np.zeros((g * 9, c)), 'mask.bias': np.zeros(g * 9)}
    >>> layer = from_dcnv3(state)
    >>> layer.groups, layer(np.ones((1, 6, 6, c), np.float32)).shape
    (4, (1, 6, 6, 16))
  """
  fn = 'from_dcnv3'
  groups, padding, kernel_dilation = _spellings(groups, group, padding, pad, kernel_dilation, dilation, fn)
  s = _state.StateReader(state, prefix, fn, param_dtype)
  _, channels = s.linear_shape('input_proj.weight')
  groups = _dcnv3_groups(s, groups, _taps(kernel_size, remove_center), fn)
  dw = _dw_kernel_size(s, 'dw_conv.0.weight') or kernel_size
  layer = nnx.eval_shape(lambda: DCNv3(
      channels, kernel_size, groups=groups, dw_kernel_size=dw, padding=padding, kernel_dilation=kernel_dilation,
      offset_scale=offset_scale, center_feature_scale=s.has('center_feature_scale_proj_weight'),
      remove_center=remove_center, param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs))
  return _loaded(layer, s, _dcnv3_entries('', layer))


def _dcnv4_groups(s: _state.StateReader, groups: int | None, taps: int, channels: int, fn: str) -> int:
  """`groups` as given, or the one count whose packed `offset_mask` width, `ceil8(groups*taps*3)`, is the weight's."""
  if groups is not None:
    return groups
  rows, _ = s.linear_shape('offset_mask.weight')
  found = [g for g in range(1, channels + 1) if channels % g == 0 and offset_mask_channels(g, taps) == rows]
  if len(found) != 1:
    raise ValueError(f'{fn}: {s.prefix}offset_mask.weight has {rows} rows, which groups={found or "none"} packs '
                     f'with {taps} taps: pass groups= (check kernel_size and remove_center)')
  return found[0]


def from_dcnv4(state: Mapping[str, np.ndarray], *, groups: int | None = None, kernel_size: int = 3,
               padding: int | None = None, kernel_dilation: int | None = None, offset_scale: float = 1.0,
               remove_center: bool = False, prefix: str = '', param_dtype: DTypeLike = np.float32,
               group: int | None = None, pad: int | None = None, dilation: int | None = None,
               **module_kwargs: Any) -> DCNv4:
  """A `DCNv4` reproducing OpenGVLab's `DCNv4` module (`DCNv4_op/DCNv4/modules/dcnv4.py`).

  Each argument takes `DCNv4`'s name or the reference's (`group`, `pad`, `dilation`), not both; the rest, and
  `groups` when not given, are read from the weights.

  Args:
    state: the module's `state_dict()` as numpy arrays: `offset_mask` (`nn.Linear` to `ceil8(groups*K*3)`),
      `value_proj` / `output_proj` (absent with `without_pointwise`; `output_proj.bias` absent with
      `output_bias=False`), `offset_mask_dw` (with `dw_kernel_size`), `center_feature_scale_proj_{weight, bias}`;
      under `prefix`.
    groups: the channel groups (the reference: `group`; read from `offset_mask.weight` when None).
    kernel_size: the sampling grid's side.
    padding: the padding (the reference: `pad`).
    kernel_dilation: the tap spacing (the reference: `dilation`; default 1).
    offset_scale: the offsets' scale.
    remove_center: whether the centre tap is dropped.
    prefix: the module's prefix in `state`.
    param_dtype: the parameters' dtype.
    group: the reference's name for `groups`.
    pad: the reference's name for `padding`.
    dilation: the reference's name for `kernel_dilation`.
    **module_kwargs: `DCNv4` options a checkpoint does not hold (`dtype`, `precision`, `chunk_size`, ...).

  Returns:
    A `DCNv4` whose output on `x [N, H, W, C]` equals the PyTorch module's on `x.reshape(N, H*W, C)` with
    `shape=(H, W)`, reshaped back.

  Raises:
    ValueError: naming a missing (with the `prefix=` to pass), wrongly shaped or unused entry.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert import from_dcnv4
    >>> c, rng = 32, np.random.default_rng(0)
    >>> state = {'value_proj.weight': rng.normal(size=(c, c)), 'value_proj.bias': np.zeros(c),
    ...          'output_proj.weight': rng.normal(size=(c, c)), 'output_proj.bias': np.zeros(c),
    ...          'offset_mask.weight': np.zeros((56, c)), 'offset_mask.bias': np.zeros(56)}
    >>> layer = from_dcnv4(state)
    >>> layer.groups, layer(np.ones((1, 6, 6, c), np.float32)).shape
    (2, (1, 6, 6, 32))
  """
  fn = 'from_dcnv4'
  groups, padding, kernel_dilation = _spellings(groups, group, padding, pad, kernel_dilation, dilation, fn)
  s = _state.StateReader(state, prefix, fn, param_dtype)
  _, channels = s.linear_shape('offset_mask.weight')
  groups = _dcnv4_groups(s, groups, _taps(kernel_size, remove_center), channels, fn)
  dw = _dw_kernel_size(s, 'offset_mask_dw.weight') or (kernel_size if s.has('offset_mask_dw.weight') else None)
  layer = nnx.eval_shape(lambda: DCNv4(
      channels, kernel_size, groups=groups, padding=padding, kernel_dilation=kernel_dilation,
      offset_scale=offset_scale, dw_kernel_size=dw, center_feature_scale=s.has('center_feature_scale_proj_weight'),
      remove_center=remove_center, output_bias=s.has('output_proj.bias'),
      without_pointwise=not s.has('value_proj.weight'), param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs))
  return _loaded(layer, s, _dcnv4_entries('', layer))


__all__ = ['from_dcnv3', 'from_dcnv4', 'from_flash_internimage', 'from_internimage', 'state_entries',
           'to_internimage_state_dict']
