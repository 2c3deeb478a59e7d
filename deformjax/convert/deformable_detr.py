"""transformers' Deformable DETR into deformjax: the detector, its encoder and its attention layer, and back.

`from_deformable_detr(state_dict, config)` builds a `deformjax.models.DeformableDetr` from a
`DeformableDetrForObjectDetection` state dict and its config dict; `to_deformable_detr_state_dict` is its inverse.
Both walk one key table (`_detector_entries`), written in transformers' v5 names; state dicts written by older
versions (`model.backbone.conv_encoder.*`, `self_attn.out_proj`, `layers.N.fc1`) are renamed to those on reading,
as transformers' own loader does. A head that the detector shares between decoder layers (`DeformableDetr`'s
module docstring says which), and the decoder's copies of the heads with box refinement, appear under every name in
a state dict, or only under the first when a file was saved with shared tensors removed: both are accepted. Per-layer
heads whose values differ (`class_embed.{i}` of the official box-refinement checkpoints) give a detector with one
head per layer, as transformers' loader leaves them apart; decoder copies that differ are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from deformjax.convert._state import (
  Entry,
  StateReader,
  check_concrete,
  check_state,
  conv_entries,
  linear_entries,
  present,
  seed_rng_streams,
  to_torch,
)
from deformjax.models.deformable_detr import (
  _ACTIVATIONS,
  DeformableDetr,
  DeformableDetrDecoderLayer,
  DeformableDetrEncoder,
  DeformableDetrEncoderLayer,
  DeformableDetrMLPHead,
)
from deformjax.models.resnet import FrozenBatchNorm, ResNet
from deformjax.nn import _common
from deformjax.nn.ms_deform_attn import MSDeformAttn
from deformjax.ops import _args

# Older transformers names -> v5 names (transformers' own `conversion_mapping` for deformable_detr).
_RENAMES = ((re.compile(r'(^|\.)backbone\.conv_encoder\.'), r'\1backbone.'),
            (re.compile(r'self_attn\.out_proj\.'), 'self_attn.o_proj.'),
            (re.compile(r'(layers\.\d+\.)fc([12])\.'), r'\1mlp.fc\2.'))
# Entries every PyTorch BatchNorm carries that have no counterpart (transformers drops them too).
_IGNORED_SUFFIXES = ('.num_batches_tracked',)


def _norm(key: str, m: nnx.LayerNorm | nnx.GroupNorm) -> Iterator[Entry]:
  yield f'{key}.weight', present(m.scale, f'{key}.weight'), 'same'
  yield f'{key}.bias', present(m.bias, f'{key}.bias'), 'same'


def _frozen_bn(key: str, m: FrozenBatchNorm) -> Iterator[Entry]:
  for name in ('weight', 'bias', 'running_mean', 'running_var'):
    yield f'{key}.{name}', getattr(m, name), 'same'


def _attention_entries(key: str, m: MSDeformAttn) -> Iterator[Entry]:
  """An `MSDeformAttn`'s rows under `key` (`''` for the layer's own state dict)."""
  for name in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj'):
    yield from linear_entries(f'{key}.{name}' if key else name, getattr(m, name))


def _encoder_layer(key: str, m: DeformableDetrEncoderLayer) -> Iterator[Entry]:
  yield from _attention_entries(f'{key}.self_attn', m.self_attn)
  yield from _norm(f'{key}.self_attn_layer_norm', m.self_attn_layer_norm)
  yield from linear_entries(f'{key}.mlp.fc1', m.fc1)
  yield from linear_entries(f'{key}.mlp.fc2', m.fc2)
  yield from _norm(f'{key}.final_layer_norm', m.final_layer_norm)


def _encoder_entries(encoder: DeformableDetrEncoder, prefix: str = '') -> list[Entry]:
  """The encoder's rows in transformers' `DeformableDetrModel` names (`input_proj.*`, `level_embed`,
  `encoder.layers.*`) under `prefix`."""
  rows: list[Entry] = []
  for level, (conv, gn) in enumerate(zip(encoder.input_convs, encoder.input_norms)):
    rows += [*conv_entries(f'{prefix}input_proj.{level}.0', conv), *_norm(f'{prefix}input_proj.{level}.1', gn)]
  rows.append((f'{prefix}level_embed', encoder.level_embed, 'same'))
  for j, layer in enumerate(encoder.layers):
    rows += list(_encoder_layer(f'{prefix}encoder.layers.{j}', layer))
  return rows


def _decoder_layer(key: str, m: DeformableDetrDecoderLayer) -> Iterator[Entry]:
  for name in ('k_proj', 'v_proj', 'q_proj', 'o_proj'):
    yield from linear_entries(f'{key}.self_attn.{name}', getattr(m.self_attn, name))
  yield from _norm(f'{key}.self_attn_layer_norm', m.self_attn_layer_norm)
  yield from _attention_entries(f'{key}.encoder_attn', m.encoder_attn)
  yield from _norm(f'{key}.encoder_attn_layer_norm', m.encoder_attn_layer_norm)
  yield from linear_entries(f'{key}.mlp.fc1', m.fc1)
  yield from linear_entries(f'{key}.mlp.fc2', m.fc2)
  yield from _norm(f'{key}.final_layer_norm', m.final_layer_norm)


def _timm_names(s: int, j: int, k: int, shortcut: bool) -> tuple[str, str]:
  head = f'layer{s + 1}.{j}.'
  return (head + 'downsample.0', head + 'downsample.1') if shortcut else (head + f'conv{k + 1}', head + f'bn{k + 1}')


def _transformers_names(s: int, j: int, k: int, shortcut: bool) -> tuple[str, str]:
  head = f'encoder.stages.{s}.layers.{j}.' + ('shortcut' if shortcut else f'layer.{k}')
  return head + '.convolution', head + '.normalization'


def _backbone_entries(backbone: ResNet, layout: str, prefix: str = 'model.backbone.model.') -> list[Entry]:
  """A `ResNet`'s rows in timm's (`conv1`, `bn1`, `layer{s}.{j}.conv{k}`, `downsample`) or transformers'
  (`embedder.embedder`, `encoder.stages.{s}.layers.{j}.layer.{k}`, `shortcut`) names."""
  names = _timm_names if layout == 'timm' else _transformers_names
  stem = ('conv1', 'bn1') if layout == 'timm' else ('embedder.embedder.convolution', 'embedder.embedder.normalization')
  rows = [*conv_entries(prefix + stem[0], backbone.stem_conv), *_frozen_bn(prefix + stem[1], backbone.stem_norm)]
  for s, stage in enumerate(backbone.stages):
    for j, block in enumerate(stage):
      for k, (conv, norm) in enumerate(zip(block.convs, block.norms)):
        conv_key, norm_key = names(s, j, k, False)
        rows += [*conv_entries(prefix + conv_key, conv), *_frozen_bn(prefix + norm_key, norm)]
      if block.shortcut_conv is not None:
        assert block.shortcut_norm is not None  # built with shortcut_conv
        conv_key, norm_key = names(s, j, 0, True)
        rows += [*conv_entries(prefix + conv_key, block.shortcut_conv),
                 *_frozen_bn(prefix + norm_key, block.shortcut_norm)]
  return rows


def _head_entries(key: str, m: nnx.Linear | DeformableDetrMLPHead) -> list[Entry]:
  if isinstance(m, DeformableDetrMLPHead):
    return [row for i, layer in enumerate(m.layers) for row in linear_entries(f'{key}.layers.{i}', layer)]
  return list(linear_entries(key, m))


def _detector_entries(detector: DeformableDetr) -> list[Entry]:
  """Every parameter of a `DeformableDetr` once, under its `DeformableDetrForObjectDetection` (v5) name.

  Returns:
    `(key, variable, layout)` rows; layout `'linear'` (`[out, in]` there), `'conv'` (OIHW there) or `'same'`.
  """
  if detector.backbone_layout is None:
    raise ValueError('to_deformable_detr_state_dict: the detector has its own backbone (DeformableDetr(backbone=...)), '
                     "which has no place in transformers' state dict")
  assert isinstance(detector.backbone, ResNet)  # the config's backbone: backbone_layout is set
  rows = _backbone_entries(detector.backbone, detector.backbone_layout)
  rows += _encoder_entries(detector.encoder, 'model.')
  for j, layer in enumerate(detector.decoder.layers):
    rows += list(_decoder_layer(f'model.decoder.layers.{j}', layer))
  if detector.two_stage:
    assert detector.enc_output is not None and detector.enc_output_norm is not None  # built for two stages
    assert detector.pos_trans is not None and detector.pos_trans_norm is not None
    rows += [*linear_entries('model.enc_output', detector.enc_output),
             *_norm('model.enc_output_norm', detector.enc_output_norm),
             *linear_entries('model.pos_trans', detector.pos_trans), *_norm('model.pos_trans_norm',
                                                                            detector.pos_trans_norm)]
  else:
    assert detector.query_position_embeddings is not None and detector.reference_points is not None  # one stage
    rows += [('model.query_position_embeddings.weight', detector.query_position_embeddings, 'same'),
             *linear_entries('model.reference_points', detector.reference_points)]
  for name in _HEADS:
    for i in sorted(set(_first_index(getattr(detector, name)))):
      rows += _head_entries(f'{name}.{i}', getattr(detector, name)[i])
  return rows


_HEADS = ('class_embed', 'bbox_embed')


def _first_index(heads: nnx.List) -> list[int]:
  """Per head, the index of its first occurrence (a shared module is one head under several indices)."""
  first: dict[int, int] = {}
  return [first.setdefault(id(head), i) for i, head in enumerate(heads)]


def _tied_keys(detector: DeformableDetr) -> dict[str, str]:
  """The names under which transformers repeats a shared head: `{copy: the name in detector_entries}`.

  A head the detector shares between layers is `{name}.{first index}`, repeated as `{name}.{i}`; with box
  refinement the decoder's `model.decoder.bbox_embed.{i}` (and with two stages `model.decoder.class_embed.{i}`) are
  the heads themselves.
  """
  tied: dict[str, str] = {}
  for name in _HEADS:
    heads = getattr(detector, name)
    decoder_copies = detector.with_box_refine if name == 'bbox_embed' else detector.two_stage
    for i, first in enumerate(_first_index(heads)):
      key = f'{name}.{first}'
      rows = [k for k, _, _ in _head_entries(key, heads[first])]
      if first != i:
        tied.update({k.replace(key, f'{name}.{i}', 1): k for k in rows})
      if decoder_copies:
        tied.update({'model.decoder.' + k.replace(key, f'{name}.{i}', 1): k for k in rows})
  return tied


def _differing_heads(state: Mapping[str, Any]) -> tuple[str, ...]:
  """The heads whose per-layer entries (`{name}.{i}.*`) in `state` differ from layer 0's."""
  out = []
  for name in _HEADS:
    pattern = re.compile(rf'^{name}\.(\d+)\.')
    for key in state:
      match = pattern.match(key)
      first = pattern.sub(f'{name}.0.', key, count=1)
      if match and first in state and not np.array_equal(np.asarray(state[key]), np.asarray(state[first])):
        out.append(name)
        break
  return tuple(out)


def _renamed(state: Mapping[str, Any], fn: str) -> dict[str, Any]:
  """`state` under v5 names, refusing two keys that become one."""
  out: dict[str, Any] = {}
  for key, value in state.items():
    new = key
    for pattern, repl in _RENAMES:
      new = pattern.sub(repl, new)
    if new in out:
      raise ValueError(f'{fn}: state holds {new!r} under two names (an older and a newer transformers version): '
                       f'{key!r} and another')
    out[new] = value
  return out


def _check_tied(state: Mapping[str, Any], tied: Mapping[str, str], reader: StateReader, fn: str) -> None:
  for copy, key in tied.items():
    if copy not in state:
      continue
    value = reader.get(copy, np.shape(state[key]) if key in state else np.shape(state[copy]))
    if key in state and not np.array_equal(value, np.asarray(state[key], reader.dtype)):
      raise ValueError(f'{fn}: {copy!r} must equal {key!r} (the reference shares one head between them), but they '
                       'differ')


def from_deformable_detr(state_dict: Mapping[str, Any], config: Mapping[str, Any], *,
                         param_dtype: DTypeLike = np.float32, dtype: DTypeLike | None = None,
                         precision: Any = None, chunk_size: int | None = None, memory_budget: int | None = None,
                         deterministic_gradients: bool = False) -> DeformableDetr:
  """A `DeformableDetr` reproducing transformers' `DeformableDetrForObjectDetection`.

  Args:
    state_dict: the model's `state_dict()` as numpy arrays (`{k: v.numpy() for k, v in sd.items()}`), under the
      names of the transformers version that wrote it (v5's `model.backbone.model.*`, `mlp.fc1`, `o_proj` or the
      older `model.backbone.conv_encoder.model.*`, `fc1`, `out_proj`). `num_batches_tracked` entries are ignored;
      shared heads may appear under every name or once; per-layer heads that differ are kept apart (see the
      module docstring).
    config: the model's `config.to_dict()` (`DeformableDetr`'s argument).
    param_dtype: the parameters' dtype.
    dtype, precision: the computation's (`nnx.Conv`'s).
    chunk_size, memory_budget, deterministic_gradients: every deformable attention's execution policy.

  Returns:
    A deterministic (eval mode) `DeformableDetr`: `detector(pixel_values, pixel_mask)` equals the model's output
    for `pixel_values` NHWC (the model's NCHW input transposed by `(0, 2, 3, 1)`).

  Raises:
    ValueError: naming a missing, unknown or misshapen entry, decoder copies of heads that differ, or an
      unsupported config value.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from deformjax.convert.deformable_detr import from_deformable_detr, to_deformable_detr_state_dict
    >>> from deformjax.models import DeformableDetr
    >>> resnet = dict(model_type='resnet', embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
    ...               layer_type='basic', out_features=['stage2', 'stage3', 'stage4'])  # transformers' ResNet
    >>> config = dict(backbone_config=resnet, use_timm_backbone=False, d_model=32, encoder_layers=1,
    ...               decoder_layers=2, num_queries=5, encoder_ffn_dim=64, decoder_ffn_dim=64,
    ...               encoder_attention_heads=2, decoder_attention_heads=2, num_labels=3)
    >>> state = to_deformable_detr_state_dict(DeformableDetr(config, rngs=nnx.Rngs(0)))
    >>> from_deformable_detr(state, config).num_queries
    5
  """
  fn = 'from_deformable_detr'
  state = _renamed(check_state(state_dict, fn), fn)
  untied = _differing_heads(state)

  def build() -> DeformableDetr:
    detector = DeformableDetr(
        config, deterministic=True, deterministic_gradients=deterministic_gradients, chunk_size=chunk_size,
        memory_budget=memory_budget, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=nnx.Rngs(0))
    if untied:
      detector.untie_heads(*untied)
    return detector

  detector = nnx.eval_shape(build)
  if detector.backbone_layout is None:
    raise ValueError(f'{fn}: the config describes no ResNet backbone')
  reader = StateReader(state, '', fn, param_dtype)
  reader.load(_detector_entries(detector))
  _check_tied(state, _tied_keys(detector), reader, fn)
  reader.used.update(k for k in state if k.endswith(_IGNORED_SUFFIXES))
  reader.check_all_used('check the config: layers, levels, two_stage, with_box_refine, the backbone', 'detector')
  seed_rng_streams(detector)
  check_concrete(detector, fn)
  return detector


def to_deformable_detr_state_dict(detector: DeformableDetr) -> dict[str, np.ndarray]:
  """The inverse of `from_deformable_detr`: `{name: array}` under transformers' v5 names, PyTorch layouts, shared
  heads under every name as `state_dict()` lists them (`load_state_dict` after `torch.from_numpy`).

  Example:
    >>> from flax import nnx
    >>> from deformjax.convert.deformable_detr import to_deformable_detr_state_dict
    >>> from deformjax.models import DeformableDetr
    >>> config = dict(backbone='resnet18', d_model=32, encoder_layers=1, decoder_layers=2, num_queries=5,
    ...               encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2)
    >>> state = to_deformable_detr_state_dict(DeformableDetr(config, rngs=nnx.Rngs(0)))
    >>> state['model.backbone.model.conv1.weight'].shape, state['class_embed.1.bias'].shape
    ((64, 3, 7, 7), (2,))
  """
  if not isinstance(detector, DeformableDetr):
    raise TypeError(f'to_deformable_detr_state_dict: detector must be a DeformableDetr, got {type(detector).__name__}')
  out = {key: to_torch(np.asarray(variable[...]), layout) for key, variable, layout in _detector_entries(detector)}
  out.update({copy: out[key] for copy, key in _tied_keys(detector).items()})
  return out


def from_deformable_detr_attention(state: Mapping[str, np.ndarray], *, num_heads: int, num_levels: int,
                                   num_points: int, prefix: str = '', param_dtype: DTypeLike = np.float32,
                                   **module_kwargs: Any) -> MSDeformAttn:
  """An `MSDeformAttn` reproducing transformers' `DeformableDetrMultiscaleDeformableAttention`
  or mmcv's `MultiScaleDeformableAttention` (the same four `nn.Linear`s).

  `MSDeformAttn` is batch-first (`[N, Lq, C]`) and returns the attention output alone, as transformers' layer
  does. mmcv's layer differs in ways the weights do not show, which the caller reproduces around the layer:
  it is sequence-first by default (transpose in and out by `(1, 0, 2)`); it returns `dropout(out) + identity`
  (add that residual); `value=None` attends to the query itself before `query_pos` is added (pass that as
  `inputs`). mmcv's `value_proj_ratio` (a narrower `value_proj`) is read from `value_proj.weight` and becomes
  `MSDeformAttn(value_features=)`.

  Args:
    state: the module's `state_dict()` as numpy arrays: `sampling_offsets`, `attention_weights`, `value_proj`,
      `output_proj` (weight and bias each), under `prefix` (e.g. `'model.encoder.layers.0.self_attn.'`).
    num_heads, num_levels, num_points: the module's `n_heads`, `n_levels`, `n_points`.
    prefix, param_dtype: the module's prefix in `state`; the parameters' dtype.
    module_kwargs: the module's own options, which a checkpoint does not hold (`dtype`, `precision`,
      `chunk_size`, `memory_budget`, `deterministic_gradients`), passed to its constructor.

  Returns:
    An `MSDeformAttn`: `layer(hidden_states + position_embeddings, reference_points, encoder_hidden_states,
    spatial_shapes, padding_mask=~attention_mask)` equals the module's first output.

  Raises:
    ValueError: naming a missing or wrongly shaped entry, or entries left unused.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert.deformable_detr import from_deformable_detr_attention
    >>> d, m, l, p, rng = 32, 4, 2, 3, np.random.default_rng(0)
    >>> state = {'sampling_offsets.weight': np.zeros((m * l * p * 2, d)), 'sampling_offsets.bias': np.zeros(48),
    ...          'attention_weights.weight': np.zeros((m * l * p, d)), 'attention_weights.bias': np.zeros(24),
    ...          'value_proj.weight': rng.normal(size=(d, d)), 'value_proj.bias': np.zeros(d),
    ...          'output_proj.weight': rng.normal(size=(d, d)), 'output_proj.bias': np.zeros(d)}
    >>> from_deformable_detr_attention(state, num_heads=m, num_levels=l, num_points=p).sampling_offsets.kernel.shape
    (32, 48)
  """
  fn = 'from_deformable_detr_attention'
  check_state(state, fn)
  key = prefix + 'value_proj.weight'
  if key not in state or np.ndim(state[key]) != 2:
    raise ValueError(f'{fn}: state must hold {key!r} as an [out, in] nn.Linear weight, got '
                     f'{np.shape(state[key]) if key in state else "none"}')
  value_features, d_model = (int(v) for v in np.shape(state[key]))
  if value_features != d_model and value_features % num_heads:
    raise ValueError(f'{fn}: {key} maps d_model={d_model} to {value_features} value channels (mmcv\'s '
                     f'value_proj_ratio={value_features / d_model:g}), which num_heads={num_heads} does not divide')
  # Built abstract: every parameter is overwritten below, so initialising them would be wasted work.
  layer = nnx.eval_shape(lambda: MSDeformAttn(d_model, num_heads, num_levels, num_points, value_features=value_features,
                                              param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs))
  reader = StateReader(state, prefix, fn, param_dtype)
  reader.load(_attention_entries('', layer))
  reader.check_all_used()
  check_concrete(layer, fn)
  return layer


# Parts of a transformers `DeformableDetrModel` state dict that are not the encoder's.
_NOT_ENCODER = ('backbone.', 'decoder.', 'query_position_embeddings.', 'reference_points.', 'enc_output.',
                'enc_output_norm.', 'pos_trans.', 'pos_trans_norm.')


def _encoder_architecture(state: Mapping[str, Any], prefix: str, fn: str) -> dict[str, Any]:
  """`d_model` and the levels from `level_embed` and `input_proj`, the layers and `encoder_ffn_dim` from
  `encoder.layers.{j}.…`, each refused by name when missing or misshapen."""
  key = prefix + 'level_embed'
  if key not in state:
    hint = (" (a DeformableDetrForObjectDetection state dict? pass prefix='model.')"
            if any(k.startswith(prefix + 'model.') for k in state) else '')
    raise ValueError(f'{fn}: state has no {key!r}{hint}; keys: {sorted(state)[:8]}...')
  if np.ndim(state[key]) != 2:
    raise ValueError(f'{fn}: {key!r} must have shape [num_feature_levels, d_model], got {np.shape(state[key])}')
  num_levels, d_model = (int(v) for v in np.shape(state[key]))
  in_features: list[int] = []
  for level in range(num_levels):
    conv = f'{prefix}input_proj.{level}.0.weight'
    shape = np.shape(state[conv]) if conv in state else None
    if shape is None or len(shape) != 4 or shape[0] != d_model or shape[2:] not in ((1, 1), (3, 3)):
      raise ValueError(f'{fn}: {conv!r} must be a [d_model={d_model}, C, 1, 1] or [d_model, C, 3, 3] Conv2d weight '
                       f'(level_embed has {num_levels} levels), got {shape}')
    if shape[2] == 1:
      if len(in_features) != level:
        raise ValueError(f'{fn}: input_proj must be 1x1 convs (backbone levels) then 3x3 convs, got {conv!r} 1x1')
      in_features.append(int(shape[1]))
  if not in_features:
    raise ValueError(f'{fn}: {prefix}input_proj.0.0.weight must be a 1x1 conv (a backbone level)')
  layers = sorted({int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r'encoder\.layers\.(\d+)\.', k)]
                   if m})
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f'{fn}: state must hold encoder.layers.0 ... encoder.layers.J-1 under {prefix!r}, got {layers}')
  fc2 = f'{prefix}encoder.layers.0.mlp.fc2.weight'
  if fc2 not in state or np.ndim(state[fc2]) != 2:
    raise ValueError(f'{fn}: state must hold {fc2!r} as an [out, in] nn.Linear weight')
  return dict(in_features=tuple(in_features), d_model=d_model, num_levels=num_levels, num_layers=len(layers),
              ffn_features=int(np.shape(state[fc2])[1]))


def from_deformable_detr_encoder(state: Mapping[str, np.ndarray], *, num_heads: int, num_points: int,
                                 num_groups: int = 32, activation_function: str = 'relu', dropout: float = 0.1,
                                 activation_dropout: float = 0.0, prefix: str = '',
                                 param_dtype: DTypeLike = np.float32, chunk_size: int | None = None,
                                 memory_budget: int | None = None,
                                 deterministic_gradients: bool = False) -> DeformableDetrEncoder:
  """A `DeformableDetrEncoder` reproducing transformers' `DeformableDetrModel` from its backbone's feature maps
  to `encoder_last_hidden_state`.

  The architecture is read from the weights: `d_model` and `num_levels` from `level_embed [L, d_model]`, the
  backbone widths and the extra stride-2 levels from `input_proj.{l}.0.weight` (1x1 then 3x3 kernels), the layers
  and `encoder_ffn_dim` from `encoder.layers.{j}.…`.

  Args:
    state: the model's `state_dict()` as numpy arrays, under `prefix` (`'model.'` for a
      `DeformableDetrForObjectDetection`), under the names of any transformers version (as
      `from_deformable_detr`). Read: `input_proj.*`, `level_embed`, `encoder.layers.*`. Ignored, as not the
      encoder's: `backbone.*`, `decoder.*`, `query_position_embeddings.*`, `reference_points.*`, `enc_output*`,
      `pos_trans*` and everything outside `prefix`; any other entry is refused by name.
    num_heads, num_points: the config's `encoder_attention_heads`, `encoder_n_points`.
    num_groups: the input projection's GroupNorm groups (transformers fixes 32).
    activation_function: the config's (`'relu'`, `'gelu'`, `'gelu_new'`, `'silu'`, ...).
    dropout, activation_dropout: the config's, used only when the encoder runs non-deterministically.
    param_dtype: the parameters' dtype.
    chunk_size, memory_budget, deterministic_gradients: every layer's attention's execution policy.

  Returns:
    A deterministic `DeformableDetrEncoder`: `enc(features, pixel_mask).last_hidden_state` equals the model's
    `encoder_last_hidden_state` for backbone maps `features` (NHWC).

  Raises:
    ValueError: naming a missing, unknown or wrongly shaped entry, or an unsupported option.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from deformjax.convert.deformable_detr import from_deformable_detr_encoder, to_deformable_detr_encoder_state_dict
    >>> from deformjax.models import DeformableDetrEncoder
    >>> enc = DeformableDetrEncoder([8], 32, num_heads=2, num_levels=2, num_points=2, num_layers=1,
    ...                             ffn_features=64, rngs=nnx.Rngs(0))
    >>> ported = from_deformable_detr_encoder(to_deformable_detr_encoder_state_dict(enc), num_heads=2, num_points=2)
    >>> ported.in_features, ported.num_levels, len(ported.layers)
    ((8,), 2, 1)
  """
  fn = 'from_deformable_detr_encoder'
  activation = _ACTIVATIONS.get(activation_function)
  if activation is None:
    raise ValueError(f'{fn}: activation_function must be one of {sorted(_ACTIVATIONS)}, got {activation_function!r}')
  # Refused here, under the converter's name, before any weight is read.
  _common.check_policy(chunk_size, memory_budget, False, fn)
  _args.check_bool(deterministic_gradients, 'deterministic_gradients', fn)
  state = _renamed(check_state(state, fn), fn)
  learned = [k for k in state if k.startswith((prefix + 'position_embedding.', prefix + 'backbone.position_embedding.'))]
  if learned:
    raise ValueError(f'{fn}: {learned[:2]} are learned position embeddings (position_embedding_type=\'learned\'); '
                     'only the sine position embedding is supported')
  arch = _encoder_architecture(state, prefix, fn)
  encoder = nnx.eval_shape(lambda: DeformableDetrEncoder(
      arch['in_features'], arch['d_model'], num_heads=num_heads, num_levels=arch['num_levels'], num_points=num_points,
      num_layers=arch['num_layers'], ffn_features=arch['ffn_features'], num_groups=num_groups, dropout=dropout,
      activation_dropout=activation_dropout, activation=activation, deterministic=True,
      deterministic_gradients=deterministic_gradients, chunk_size=chunk_size, memory_budget=memory_budget,
      param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  reader = StateReader(state, prefix, fn, param_dtype)
  reader.load(_encoder_entries(encoder, ''))
  reader.used.update(k for k in state if k.startswith(prefix) and k[len(prefix):].startswith(_NOT_ENCODER))
  reader.check_all_used('a different configuration or model? check the prefix', 'encoder')
  seed_rng_streams(encoder)
  check_concrete(encoder, fn)
  return encoder


def to_deformable_detr_encoder_state_dict(encoder: DeformableDetrEncoder, prefix: str = '') -> dict[str, np.ndarray]:
  """The inverse of `from_deformable_detr_encoder`: the encoder's parameters under transformers' (v5) names.

  Returns:
    `{name: array}` with `input_proj.{l}.0/1.*`, `level_embed` and `encoder.layers.{j}.*` (under `prefix`) in
    PyTorch layouts (`[out, in]` linears, OIHW convs).

  Example:
    >>> from flax import nnx
    >>> from deformjax.convert.deformable_detr import to_deformable_detr_encoder_state_dict
    >>> from deformjax.models import DeformableDetrEncoder
    >>> enc = DeformableDetrEncoder([8], 32, num_heads=2, num_levels=1, num_points=2, num_layers=1,
    ...                             ffn_features=64, rngs=nnx.Rngs(0))
    >>> state = to_deformable_detr_encoder_state_dict(enc)
    >>> state['input_proj.0.0.weight'].shape, state['encoder.layers.0.mlp.fc1.weight'].shape
    ((32, 8, 1, 1), (64, 32))
  """
  if not isinstance(encoder, DeformableDetrEncoder):
    raise TypeError(f'to_deformable_detr_encoder_state_dict: encoder must be a DeformableDetrEncoder, got '
                    f'{type(encoder).__name__}')
  return {key: to_torch(np.asarray(v[...]), layout) for key, v, layout in _encoder_entries(encoder, prefix)}


__all__ = ['from_deformable_detr', 'from_deformable_detr_attention', 'from_deformable_detr_encoder',
           'to_deformable_detr_encoder_state_dict', 'to_deformable_detr_state_dict']
