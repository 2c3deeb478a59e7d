"""What the NNX modules and their Linen twins share: turning a raw prediction
into offsets and mask, shaping calls with arbitrary leading batch dims, and the
arguments, initialisers and gates of the DCNv3 / DCNv4 blocks.

Keeping it here is what makes the twins compute the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from deformjax.ops import _args, dcnv3_taps

# PyTorch's default Conv2d kernel initialisation (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_kernel_init = initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
_xavier_uniform = initializers.xavier_uniform()


def mask_from_logits(logits: jax.Array) -> jax.Array:
  """2 * sigmoid(logits): equals 1 at the zero init, so a fresh modulated layer
  is exactly a regular conv / RoIAlign; ranges over (0, 2) once trained."""
  return 2.0 * jax.nn.sigmoid(logits)


def split_prediction(pred: jax.Array, num_offsets: int, modulated: bool, offset_scale: float,
                     max_offset: float | None) -> tuple[jax.Array, jax.Array | None]:
  """Splits an offset-predictor output `[..., num_offsets (+ num_offsets // 2)]`.

  Returns `(offsets, mask)`: offsets are `offset_scale * raw`, softly bounded to
  `max_offset * tanh(. / max_offset)` when `max_offset` is set; mask is
  `mask_from_logits` of the rest when `modulated`, else None.
  """
  offsets = pred[..., :num_offsets] * offset_scale
  if max_offset is not None:
    offsets = max_offset * jnp.tanh(offsets / max_offset)
  mask = mask_from_logits(pred[..., num_offsets:]) if modulated else None
  return offsets, mask


@overload
def flatten_batch(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array: ...
@overload
def flatten_batch(x: None, batch_shape: tuple[int, ...]) -> None: ...
@overload
def flatten_batch(x: jax.Array | None, batch_shape: tuple[int, ...]) -> jax.Array | None: ...
def flatten_batch(x: jax.Array | None, batch_shape: tuple[int, ...]) -> jax.Array | None:
  """[*batch, H, W, F] -> [prod(batch), H, W, F] (unbatched [H, W, F] -> [1, ...])."""
  if x is None:
    return None
  return x.reshape((-1,) + x.shape[len(batch_shape):])


def unflatten_batch(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  """[prod(batch), ...] -> [*batch, ...]: `flatten_batch` undone."""
  return x.reshape(batch_shape + x.shape[1:])


def deform_conv_any_batch(inputs: jax.Array, offsets: jax.Array, kernel: jax.Array, mask: jax.Array | None,
                          bias: jax.Array | None, **conv_kwargs: Any) -> jax.Array:
  """`deform_conv2d` for inputs `[..., H, W, C]` with any leading batch dims (or none);
  offsets and the modulation `mask` carry the same leading dims."""
  from deformjax.ops.deform_conv import deform_conv2d

  batch = inputs.shape[:-3]
  y = deform_conv2d(flatten_batch(inputs, batch), flatten_batch(offsets, batch), kernel, flatten_batch(mask, batch),
                    bias, **conv_kwargs)
  return unflatten_batch(y, batch)


def check_policy(chunk_size: int | None, memory_budget: int | None, deterministic_gradients: bool, name: str) -> None:
  """The ops' execution-policy keywords, refused by the layer's name when it is built (as the op would refuse them):
  `chunk_size` / `memory_budget` positive ints or None (ValueError), `deterministic_gradients` a bool (TypeError)."""
  _args.check_policy(chunk_size, memory_budget, deterministic_gradients, name)


@dataclasses.dataclass(frozen=True)
class SamplingPolicy:
  """How an NNX sampling module runs its op: the ops' `chunk_size`, `memory_budget`, `deterministic_gradients`.

  One static attribute (`module.policy`), and not named `deterministic`: `nnx.Module.train()` / `.eval()` set every
  attribute of that name (dropout's flag), which would switch the gradient policy with the mode.
  """

  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic_gradients: bool = False

  def as_kwargs(self) -> dict[str, Any]:
    """The op's keyword arguments."""
    return dataclasses.asdict(self)


def sampling_policy(chunk_size: int | None, memory_budget: int | None, deterministic_gradients: bool, name: str
                    ) -> SamplingPolicy:
  """`check_policy`, then the checked values as a `SamplingPolicy`."""
  check_policy(chunk_size, memory_budget, deterministic_gradients, name)
  return SamplingPolicy(chunk_size, memory_budget, deterministic_gradients)


def check_in_features(inputs: jax.Array, in_features: int, name: str, arg: str = 'in_features') -> None:
  """Refuses inputs that are not `[..., H, W, in_features]`, naming the layer and its argument `arg` for the width."""
  if inputs.ndim < 3 or inputs.shape[-1] != in_features:
    raise ValueError(f'{name}: inputs must have shape [..., H, W, {arg}={in_features}], got {tuple(inputs.shape)}'
                     + _args.channels_last_hint(tuple(inputs.shape), in_features, 'inputs', name))


def check_kernel_mask(mask: jax.Array | None, kernel_shape: tuple[int, ...], name: str) -> None:
  """The constructor's `mask` is nnx.Conv's kernel mask: None or an array of the kernel's shape."""
  if mask is not None and tuple(jnp.shape(mask)) != tuple(kernel_shape):
    raise ValueError(
        f"{name}: mask (the constructor's, nnx.Conv's kernel mask) must have the kernel's shape "
        f'[kh, kw, in_features // feature_group_count, out_features] = {tuple(kernel_shape)}, got '
        f"{tuple(jnp.shape(mask))}; the DCNv2 modulation [..., Ho, Wo, offset_groups*kh*kw] is the call's mask, or "
        'predicted with modulated=True')


def check_modulation(mask: jax.Array | None, taps: int, kernel_shape: tuple[int, ...], name: str) -> None:
  """The call's `mask` is the DCNv2 modulation: `[..., Ho, Wo, taps]` (the op checks Ho and Wo)."""
  if mask is not None and (jnp.ndim(mask) < 3 or jnp.shape(mask)[-1] != taps):
    shape = tuple(jnp.shape(mask))
    hint = _args.channels_last_hint(shape, taps, 'mask', f'{name}.__call__')
    raise ValueError(
        f'{name}.__call__: mask (the DCNv2 modulation) must have shape [..., Ho, Wo, offset_groups*kh*kw={taps}], '
        f'got {shape}' + (hint or f"; a kernel mask {tuple(kernel_shape)} belongs to the constructor's mask"))


def conv_geometry(strides: Any, input_dilation: Any, kernel_dilation: Any, name: str
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
  """nnx.Conv / nn.Conv geometry arguments -> (strides, kernel_dilation) pairs for the op.

  Accepts what flax accepts: None (1), an int, or any length-2 sequence, numpy
  arrays included. `input_dilation` (fractionally strided conv) has no
  deformable counterpart here: the op samples the input as it is, so anything
  but 1 is refused by name.
  """
  def pair(value: Any, arg: str) -> tuple[int, int]:
    if value is None:
      return (1, 1)
    if hasattr(value, 'tolist'):  # numpy arrays and scalars
      value = value.tolist()
    return _args.positive_pair(value, arg, name)

  if pair(input_dilation, 'input_dilation') != (1, 1):
    raise ValueError(f'{name}: input_dilation={input_dilation!r} is not supported: a deformable conv samples the '
                     'input at its own resolution; upsample it explicitly (e.g. jax.image.resize) instead')
  return pair(strides, 'strides'), pair(kernel_dilation, 'kernel_dilation')


# nnx.Conv's padding modes that pad the image itself -> jnp.pad's mode.
_PADDING_MODES = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}


def pad_for_mode(inputs: jax.Array, padding: _args.PaddingLike, kernel_hw: Sequence[int], dilation: Sequence[int]
                 ) -> tuple[jax.Array, _args.PaddingLike]:
  """CIRCULAR / REFLECT as nnx.Conv does them: pad the image (wrap / reflect) by the
  dilated kernel's SAME amounts, then convolve VALID. A deformable conv then samples
  the padded image: zero offsets give exactly nnx.Conv's result, and offsets may
  reach into the wrapped / reflected border (beyond it, points read 0 as usual).
  Returns `(inputs, padding)` to hand to the op."""
  if not (isinstance(padding, str) and padding.upper() in _PADDING_MODES):
    return inputs, padding
  window = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
  pads = [(0, 0)] * (inputs.ndim - 3) + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)]
  return jnp.pad(inputs, pads, mode=_PADDING_MODES[padding.upper()]), 'VALID'


def check_padding(padding: _args.PaddingLike, name: str) -> None:
  """Refuses, at construction, a padding neither the op nor nnx.Conv / nn.Conv reads."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID', *_PADDING_MODES):
      raise ValueError(f"{name}: padding must be 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', an int, (ph, pw) or "
                       f"((top, bottom), (left, right)) of ints, got {padding!r}")
    return
  _args.padding_pairs(padding, (1, 1), (1, 1), (1, 1), name)  # numeric forms need no input size


def check_geometry(inputs: jax.Array, kernel_hw: Sequence[int], strides: tuple[int, int],
                   padding: _args.PaddingLike, dilation: tuple[int, int], name: str) -> None:
  """An input too small for the (dilated) kernel, refused under the layer's name before its offset predictor (a
  plain conv, which would fail on it without naming the cause) runs: the op's own window check."""
  if isinstance(padding, str) and padding.upper() in _PADDING_MODES:
    return  # padded by the kernel's own extent: every input size has outputs
  (h, w), (kh, kw) = inputs.shape[-3:-1], kernel_hw
  _args.conv_window((h, w), (kh, kw), strides, padding, dilation, name)


def num_taps(kernel_size: int, remove_center: bool) -> int:
  """Sampling points per group of a DCNv3 / DCNv4 block: `kernel_size**2`, less the centre tap with `remove_center`."""
  return int(dcnv3_taps((kernel_size, kernel_size), remove_center=remove_center)[0].size)


def check_block_args(name: str, channels: int, kernel_size: int, groups: int, dilation: int,
                     padding: int | None, remove_center: bool, dw_kernel_size: int | None) -> int:
  """Validates the shared DCNv3 / DCNv4 geometry; returns the padding (default: the window's half, which keeps H, W)."""
  for arg, value in (('channels', channels), ('kernel_size', kernel_size), ('groups', groups),
                     ('kernel_dilation', dilation)):
    _args.positive_int(value, arg, name)
  if dw_kernel_size is not None:
    _args.positive_int(dw_kernel_size, 'dw_kernel_size', name)
    if dw_kernel_size % 2 == 0:
      raise ValueError(f'{name}: dw_kernel_size must be odd (the depthwise conv keeps H, W), got {dw_kernel_size}')
  if channels % groups:
    raise ValueError(f'{name}: channels={channels} must be divisible by groups={groups}')
  if remove_center and kernel_size % 2 == 0:
    raise ValueError(f'{name}: remove_center needs an odd kernel_size, got {kernel_size}')
  if padding is None:
    padding = dilation * (kernel_size - 1) // 2
  _args.pair(padding, 'padding', name)
  if 2 * padding != dilation * (kernel_size - 1):
    raise ValueError(f'{name}: padding={padding} must keep the spatial size (the offsets are predicted at every '
                     f'input pixel): 2 * padding == kernel_dilation * (kernel_size - 1) = '
                     f'{dilation * (kernel_size - 1)}')
  return int(padding)


def softmax_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """Softmaxes run in float32 at least: bf16 / f16 logits would lose the small weights."""
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def blend_center(x: jax.Array, x_proj: jax.Array, scale_logits: jax.Array, groups: int) -> jax.Array:
  """`center_feature_scale`: `x * (1 - s) + x_proj * s`, `s = sigmoid(logits)` per group `[..., groups]`,
  broadcast over each group's `C // groups` channels."""
  s = jax.nn.sigmoid(scale_logits).astype(x.dtype)
  s = jnp.repeat(s, x.shape[-1] // groups, axis=-1)
  return x * (1 - s) + x_proj * s


# A layer of a block function (`dcnv3_block`, `dcnv4_block`): NNX module or Linen submodule alike.
Layer = Callable[[jax.Array], jax.Array]


def linear(cin: int, cout: int, *, use_bias: bool = True, kernel_init: nnx.Initializer = _xavier_uniform,
           dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs) -> nnx.Linear:
  """`nnx.Linear` with the DCNv3 / DCNv4 references' initialisation: Xavier-uniform kernel (by default), zero bias."""
  return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=kernel_init, bias_init=initializers.zeros_init(),
                    dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)


def depthwise_conv(channels: int, kernel_size: int, *, dtype: Any, param_dtype: Any, precision: Any,
                   rngs: nnx.Rngs) -> nnx.Conv:
  """The references' depthwise `nn.Conv2d` (square, odd kernel keeping H, W): PyTorch's default kernel
  distribution, zero bias."""
  return nnx.Conv(channels, channels, (kernel_size, kernel_size), padding=(kernel_size - 1) // 2,
                  feature_group_count=channels, kernel_init=torch_conv_kernel_init,
                  bias_init=initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype, precision=precision,
                  rngs=rngs)


__all__ = ['Layer', 'SamplingPolicy', 'blend_center', 'check_block_args', 'check_geometry', 'check_in_features',
           'check_kernel_mask', 'check_modulation', 'check_padding', 'check_policy', 'conv_geometry',
           'deform_conv_any_batch', 'depthwise_conv', 'flatten_batch', 'linear', 'mask_from_logits', 'num_taps',
           'pad_for_mode', 'sampling_policy', 'softmax_dtype', 'split_prediction', 'torch_conv_kernel_init',
           'unflatten_batch']
