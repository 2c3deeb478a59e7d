"""Argument normalisation and validation shared by the ops.

Every check runs on static shapes at trace time, so a bad call fails with a
message that names the argument before XLA ever sees it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# What a padding argument may be: a mode's name, an int, (ph, pw), ((top, bottom), (left, right)); flax's own
# `PaddingLike` (pairs or ints per axis) is among them, and the checks refuse the mixed forms by name.
PaddingLike = str | int | Sequence[int] | Sequence[Sequence[int]] | Sequence[int | tuple[int, int]]


def is_int(value: Any) -> TypeGuard[int | np.integer]:
  """A Python or NumPy integer, bools excluded: Python counts `True` as 1, and as a size or a count it is a slip.

  >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
  (True, True, False, False)
  """
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """A Python or NumPy int or float, bools excluded (as `is_int`)."""
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_bool(value: Any, name: str, fn: str) -> None:
  """TypeError naming `name` unless `value` is a bool (Python's or NumPy's)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{fn}: {name} must be a bool, got {value!r}')


def pair(value, name: str, fn: str) -> tuple[int, int]:
  """Normalises an int or a length-2 sequence of ints to a pair of ints."""
  if is_int(value):
    return int(value), int(value)
  if isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
    return int(value[0]), int(value[1])
  raise ValueError(f'{fn}: {name} must be an int or a pair of ints, got {value!r}')


def positive_int(value, name: str, fn: str) -> int:
  """`value` as an int >= 1 (bools refused), else a ValueError naming `name`."""
  if not is_int(value) or value < 1:
    raise ValueError(f'{fn}: {name} must be a positive int, got {value!r}')
  return int(value)


def positive_pair(value, name: str, fn: str) -> tuple[int, int]:
  """`pair(value)` with both entries >= 1."""
  p = pair(value, name, fn)
  if p[0] < 1 or p[1] < 1:
    raise ValueError(f'{fn}: {name} must be positive, got {value!r}')
  return p


def _is_int_pair(value: Any) -> TypeGuard[Sequence[int | np.integer]]:
  """A length-2 sequence of ints (`is_int`), strings excluded."""
  return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
          and all(is_int(v) for v in value))


def padding_pairs(
    padding: PaddingLike,
    in_hw: tuple[int, int],
    window_hw: tuple[int, int],
    strides: tuple[int, int],
    fn: str,
) -> tuple[tuple[int, int], tuple[int, int]]:
  """Normalises padding to ((top, bottom), (left, right)).

  Accepts an int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'
  (the last two with `lax.conv_general_dilated`'s meaning; `window_hw` is the
  dilated kernel size).
  """
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"{fn}: padding must be 'SAME', 'VALID', an int, a pair or a pair of pairs, got {padding!r}")
    pads = lax.padtype_to_pads(in_hw, window_hw, strides, padding.upper())
    return (_dim(pads[0][0]), _dim(pads[0][1])), (_dim(pads[1][0]), _dim(pads[1][1]))
  result: tuple[tuple[int, int], tuple[int, int]]
  if is_int(padding):
    p = int(padding)
    result = ((p, p), (p, p))
  elif isinstance(padding, Sequence) and len(padding) == 2 and is_int(padding[0]) and is_int(padding[1]):
    result = ((int(padding[0]),) * 2, (int(padding[1]),) * 2)
  elif (
      isinstance(padding, Sequence)
      and len(padding) == 2
      and _is_int_pair(padding[0])
      and _is_int_pair(padding[1])
  ):
    result = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
  else:
    raise ValueError(
        f"{fn}: padding must be 'SAME', 'VALID', an int, (ph, pw) or ((top, bottom), (left, right)) of ints, "
        f"got {padding!r}"
    )
  if min(result[0] + result[1]) < 0:
    raise ValueError(f'{fn}: padding must be non-negative, got {padding!r}')
  return result


def frozen(value: Any) -> Any:
  """A checked static argument as `jax.jit` can key it: lists and tuples as nested tuples, NumPy ints as ints.

  >>> frozen([1, (2, np.int64(3))])
  (1, (2, 3))
  """
  if isinstance(value, (list, tuple)):
    return tuple(frozen(v) for v in value)
  return int(value) if isinstance(value, np.integer) else value


def _dim(v):
  """int for a concrete size; a `jax.export` symbolic size (SAME padding of a symbolic H) stays symbolic."""
  return v if jax.export.is_symbolic_dim(v) else int(v)


def is_symbolic(*dims: Any) -> bool:
  """True if any dimension is a `jax.export` symbolic dimension."""
  return any(jax.export.is_symbolic_dim(d) for d in dims)


# jax.errors has it from jax 0.10; older jax (down to the 0.8.1 floor) has it in jax.core only.
_Inconclusive = getattr(jax.errors, 'InconclusiveDimensionOperation', None) or jax.core.InconclusiveDimensionOperation


def known_le(a: Any, b: Any) -> bool | None:
  """`a <= b` for possibly symbolic dims: True/False when decidable, None when not."""
  try:
    return bool(a <= b)
  except _Inconclusive:  # depends on the symbolic value
    return None


class ConvWindow(NamedTuple):
  """Where a conv window of stride `strides` and dilation `dilation` sits on the padded input (all static)."""
  out_hw: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
  strides: tuple[int, int]
  dilation: tuple[int, int]


def conv_window(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: int | Sequence[int],
                padding: PaddingLike, dilation: int | Sequence[int], fn: str) -> ConvWindow:
  """The output size and explicit padding of a `kh x kw` window over an `H x W` input, `lax.conv_general_dilated`'s
  arithmetic; strides and dilation normalised to positive pairs, each argument refused by name in `fn`'s errors.

  >>> conv_window((8, 8), (3, 3), 2, 'SAME', 1, 'doc')
  ConvWindow(out_hw=(4, 4), pads=((0, 1), (0, 1)), strides=(2, 2), dilation=(1, 1))
  """
  sh, sw = positive_pair(strides, 'strides', fn)
  dh, dw = positive_pair(dilation, 'dilation', fn)
  kh, kw = kernel_hw
  window = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
  pads = padding_pairs(padding, in_hw, window, (sh, sw), fn)
  sizes = []
  for size, (lo, hi), win, s, axis in zip(in_hw, pads, window, (sh, sw), 'HW'):
    if known_le(win, size + lo + hi) is False:
      raise ValueError(
          f'{fn}: padded input {axis} = {size}+{lo}+{hi} is smaller than the dilated kernel '
          f'({win}); no output position exists'
      )
    sizes.append((size + lo + hi - win) // s + 1)
  return ConvWindow((sizes[0], sizes[1]), pads, (sh, sw), (dh, dw))


def static_shape(x) -> tuple:
  """The shape of `x` as a tuple of ints (or `jax.export` symbolic dims), known at trace time.

  Read from the array itself with `np.shape`, never with `jnp.shape`: converters
  that trace through JAX (jax2onnx) replace `jnp.shape` by an op returning a
  traced array, and a traced shape cannot decide a Python `if`.
  """
  return tuple(np.shape(x))


def check_rank(x, rank: int, name: str, layout: str, fn: str) -> None:
  """ValueError naming `name`, the `layout` it needs and the shape it got, unless `x` has rank `rank`."""
  if len(static_shape(x)) != rank:
    raise ValueError(f'{fn}: {name} must have rank {rank} ({layout}), got shape {static_shape(x)}')


def check_shape(x, expected: tuple[int, ...], name: str, layout: str, fn: str) -> None:
  """ValueError naming `name`, its `layout` = `expected` and the shape it got, unless `x` has that shape."""
  if static_shape(x) != tuple(expected):
    raise ValueError(
        f'{fn}: {name} must have shape {layout} = {tuple(expected)}, got {static_shape(x)}'
    )


def as_array(x, name: str, fn: str):
  """Anything `jnp.asarray` accepts (NumPy arrays, lists, scalars) as a jax.Array; None stays None.

  NumPy inputs must not reach the ops' `.at[...]` gathers outside jit, and a
  list must not be echoed whole into an error message.
  """
  if x is None or isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f'{fn}: {name} must be an array (anything jnp.asarray accepts), got {type(x).__name__}: '
                    f'{str(e).splitlines()[0][:200]}') from None


# PyTorch's layout of an array deformjax takes channels-last: (its name, deformjax's, the transpose from one to the
# other). Kernels: OIHW [C_out, C_in/groups, kh, kw] -> HWIO [kh, kw, C_in/groups, C_out].
TORCH_LAYOUTS = MappingProxyType({'NCHW': ('NCHW', 'NHWC', (0, 2, 3, 1)), 'OIHW': ('OIHW', 'HWIO', (2, 3, 1, 0))})


def layout_hint(check: Callable[..., Any], layouts: Mapping[str, str], fn: str, arrays: dict[str, Any]) -> str | None:
  """Why `check(**arrays)` failed, when the reason is PyTorch's layout: the message, else None.

  Tries the arrays named in `layouts` (name -> 'NCHW' or 'OIHW') transposed to deformjax's layout, fewest first,
  on their shapes alone; when a set of them passes `check`, says which arrays look PyTorch-laid-out, the layout
  deformjax expects and the transpose that gives it.

  >>> def check(x):
  ...   if x.shape[-1] != 3: raise ValueError('x must have 3 channels')
  >>> layout_hint(check, {'x': 'NCHW'}, 'doc', {'x': np.zeros((1, 3, 8, 8))})
  'doc: x (shape (1, 3, 8, 8)) looks NCHW (PyTorch): deformjax is NHWC: pass x.transpose(0, 2, 3, 1)'
  """
  shapes = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for k, v in arrays.items() if v is not None}
  names = [k for k in layouts if k in shapes and len(shapes[k].shape) == 4]
  for count in range(1, len(names) + 1):
    for chosen in itertools.combinations(names, count):
      trial: dict[str, jax.ShapeDtypeStruct | None] = {k: shapes.get(k) for k in arrays}
      for k in chosen:
        trial[k] = jax.ShapeDtypeStruct(tuple(np.take(shapes[k].shape, TORCH_LAYOUTS[layouts[k]][2])),
                                        shapes[k].dtype)
      try:
        check(**trial)
      except (ValueError, TypeError):
        continue
      return f'{fn}: ' + '; '.join(
          f'{k} (shape {shapes[k].shape}) looks {TORCH_LAYOUTS[layouts[k]][0]} (PyTorch): deformjax is '
          f'{TORCH_LAYOUTS[layouts[k]][1]}: pass {k}.transpose{TORCH_LAYOUTS[layouts[k]][2]}' for k in chosen)
  return None


def checked(check: Callable[..., Any], layouts: Mapping[str, str], fn: str, arrays: dict[str, Any]) -> Any:
  """`check(**arrays)`; when it refuses them and `layout_hint` finds PyTorch's layout the cause, that hint instead."""
  try:
    return check(**arrays)
  except ValueError:
    hint = layout_hint(check, layouts, fn, arrays)
    if hint is None:
      raise
  raise ValueError(hint)


def channels_last_hint(shape: tuple[int, ...], channels: int, name: str, fn: str) -> str:
  """`' ...'` naming the transpose when `shape` ([..., C, H, W]) carries `channels` where NHWC puts H, else ''."""
  if len(shape) >= 3 and shape[-3] == channels and shape[-1] != channels:
    perm = tuple(range(len(shape) - 3)) + tuple(len(shape) + i for i in (-2, -1, -3))
    return f'; {name} looks NCHW (PyTorch): deformjax is NHWC: pass {name}.transpose{perm}'
  return ''


def check_floating(x, name: str, fn: str) -> None:
  """TypeError naming `name` and its dtype unless `x` is a floating-point array."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f'{fn}: {name} must be a floating-point array, got dtype {jnp.result_type(x)}')


def check_policy(chunk_size: int | None, memory_budget: int | None, deterministic_gradients: bool, fn: str) -> None:
  """The execution-policy keywords every sampling op shares, refused by name: `chunk_size` / `memory_budget`
  positive ints or None (ValueError), `deterministic_gradients` a bool (TypeError)."""
  for name, value in (('chunk_size', chunk_size), ('memory_budget', memory_budget)):
    if value is not None and (not is_int(value) or value < 1):
      raise ValueError(f'{fn}: {name} must be a positive int or None, got {value!r}')
  check_bool(deterministic_gradients, 'deterministic_gradients', fn)


def promote(*dtypes) -> np.dtype:
  """The op's own dtype policy, independent of the user's promotion setting.

  Mixed float inputs (say bf16 activations with f32 kernels) are a choice the op
  makes explicitly, so it must not raise under `jax_numpy_dtype_promotion=strict`.
  """
  with jax.numpy_dtype_promotion('standard'):
    return np.dtype(jnp.result_type(*dtypes))


def coordinate_dtype(*dtypes) -> np.dtype:
  """Sampling positions need at least float32: bf16 cannot even hold 257.5."""
  return promote(*dtypes, jnp.float32)


def index_dtype(size: int, fn: str) -> np.dtype:
  """int32 flat indices while they fit; int64 (needs jax_enable_x64) beyond.

  A symbolic size (an input exported with `jax.export` symbolic shapes) cannot
  be checked at trace time and gets int32: such an export serves inputs of
  fewer than 2**31 elements.
  """
  if jax.export.is_symbolic_dim(size) or size < 2**31:
    return np.dtype(np.int32)
  if jnp.zeros((), jnp.int64).dtype != np.int64:
    raise ValueError(
        f'{fn}: the flattened input has {size} elements (>= 2**31); enable jax_enable_x64 '
        'for 64-bit indices or split the batch'
    )
  return np.dtype(np.int64)


__all__ = ['TORCH_LAYOUTS', 'ConvWindow', 'PaddingLike', 'as_array', 'channels_last_hint', 'check_bool',
           'check_floating', 'check_policy', 'check_rank', 'check_shape', 'checked', 'conv_window', 'coordinate_dtype',
           'frozen', 'index_dtype', 'is_int', 'is_real', 'is_symbolic', 'known_le', 'layout_hint', 'pair',
           'padding_pairs', 'positive_int', 'positive_pair', 'promote', 'static_shape']
