"""The studies' small classifiers, with a switch choosing which convs are deformable.

`ConvClassifier` is the 5-conv network of the MNIST and COCO studies (3x3 convs,
32 channels: conv1 -> pool -> conv2 -> pool -> conv3 -> conv4 -> conv5 -> global
average pool -> [dropout] -> linear). `CifarNet` is the small CIFAR-10 net of the
training-time study. `deformable` picks how many of the *last* convs become
`deformjax.nn.DeformConv` ('none' = 0, 'all' = every conv, or an int); the
deformable layers keep the regular layers' geometry, so both variants see
feature maps of identical shapes and differ only in where they sample.

`conv` picks the member of the deformable family those convs become: 'dcnv1'
(`DeformConv`), 'dcnv2' (`DeformConv(modulated=True)`), 'dcnv3' / 'dcnv4'
(`deformjax.nn.DCNv3` / `DCNv4` blocks in a residual `x + block(x)`, the way
InternImage and FlashInternImage use them; they keep the width, so they can
replace only the width-preserving convs). Unset, `modulated` chooses between
'dcnv1' and 'dcnv2' as before.

`build_model` also builds the InternImage classifiers ('internimage' over DCNv3,
'flash_internimage' over DCNv4) at a named size (`preset`). Every one of their
blocks is deformable by design, so `deformable`, `modulated` and `conv` do not
apply to them, and their stochastic depth is the preset's (`dropout` does not
apply either).
"""

from __future__ import annotations

import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.typing import DTypeLike

from deformjax.models.internimage import FLASH_INTERNIMAGE_PRESETS, INTERNIMAGE_PRESETS, FlashInternImage, InternImage
from deformjax.nn import DCNv3, DCNv4, DeformConv
from deformjax.ops._args import is_int

CONVS = ('dcnv1', 'dcnv2', 'dcnv3', 'dcnv4')
# Channel groups of the DCNv3 / DCNv4 blocks: 4 groups of 8 channels at the studies' width 32.
_FAMILY_GROUPS = 4


def resolve_deformable(deformable: int | str, num_convs: int) -> int:
  """'none' | 'all' | k (int or digit string) -> how many of the last convs are deformable."""
  if isinstance(deformable, str) and deformable.isdigit():
    deformable = int(deformable)
  if deformable == 'none':
    return 0
  if deformable == 'all':
    return num_convs
  if is_int(deformable) and 0 <= deformable <= num_convs:
    return int(deformable)
  raise ValueError(f"deformable must be 'none', 'all' or an int in [0, {num_convs}], got {deformable!r}")


def resolve_conv(conv: str | None, modulated: bool) -> str:
  """The deformable conv a classifier uses: `conv` when set ('dcnv1' | 'dcnv2' | 'dcnv3' | 'dcnv4'), else
  'dcnv2' if `modulated` else 'dcnv1'.

  Example:
    >>> from deformjax.models import resolve_conv
    >>> resolve_conv(None, True), resolve_conv('dcnv3', False)
    ('dcnv2', 'dcnv3')
  """
  if conv is None or conv == '':
    return 'dcnv2' if modulated else 'dcnv1'
  if conv not in CONVS:
    raise ValueError(f"conv must be one of {', '.join(repr(c) for c in CONVS)} (or None), got {conv!r}")
  if modulated and conv != 'dcnv2':
    raise ValueError(f'modulated=True asks for DCNv2 but conv={conv!r}; set one of them')
  return conv


class Residual(nnx.Module):
  """`x + block(x)`: how the DCNv3 / DCNv4 blocks sit in their networks (a fresh DCNv4 computes 0, so a
  stack of them without the skip would pass no signal and no gradient).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models.classifiers import Residual
    >>> from deformjax.nn import DCNv4
    >>> block = Residual(DCNv4(16, groups=2, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((1, 4, 4, 16), jnp.float32)
    >>> bool(jnp.all(block(x) == x))  # a fresh DCNv4 adds zero
    True
  """

  def __init__(self, block: nnx.Module):
    self.block = block

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.block(x)


def _conv(cin, cout, kernel, padding, deformable, conv, dtype, rngs):
  if not deformable:
    return nnx.Conv(cin, cout, (kernel, kernel), padding=padding, dtype=dtype, rngs=rngs)
  if conv in ('dcnv1', 'dcnv2'):
    return DeformConv(cin, cout, kernel, padding=padding, modulated=conv == 'dcnv2', dtype=dtype, rngs=rngs)
  if cin != cout or padding not in (1, 'SAME') or kernel % 2 == 0:
    raise ValueError(f'conv={conv!r} blocks keep the width and the spatial size: they can replace a '
                     f'{cin}->{cout} conv only when in == out, the kernel is odd and the padding keeps the size '
                     f'(got kernel {kernel}, padding {padding!r}); make fewer convs deformable')
  block = DCNv3 if conv == 'dcnv3' else DCNv4
  extra: dict[str, Any] = {} if conv == 'dcnv3' else {'dw_kernel_size': 3}  # FlashInternImage's DCNv4 offset branch
  return Residual(block(cout, kernel, groups=_FAMILY_GROUPS, dtype=dtype, rngs=rngs, **extra))


def _max_pool(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, VALID, of `x [N, H, W, C]` -> `[N, H // 2, W // 2, C]`.

  A reshape and a max rather than `nnx.max_pool`: the same forward values, and a
  backward of elementwise compares instead of XLA's select-and-scatter, which on
  XLA:CPU took more than half of the 5-conv classifier's training step (52.7 ->
  20.7 ms, batch 64, 2 cores). At ties the gradient is shared equally among the
  tied inputs instead of going to the first one (after a ReLU, ties are zeros,
  whose gradient the ReLU discards anyway).
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _avg_pool(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2, VALID: `x [N, H, W, C]` -> `[N, H // 2, W // 2, C]`."""
  # flax's avg_pool divides by an int64 count, which strict dtype promotion rejects.
  # The init value must be a concrete scalar: JAX recognises a constant 0 with
  # lax.add as `reduce_window_sum`, which is differentiable; a traced zero
  # (jnp.zeros under jit) makes the generic reduce_window, which is not.
  window = (1, 2, 2, 1)
  return lax.reduce_window(x, np.zeros((), x.dtype), lax.add, window, window, 'VALID') / 4.0


class ConvClassifier(nnx.Module):
  """5-conv classifier of the studies (MNIST / digits: 1 channel; COCO: 3 channels, BCE).

  Args:
    in_features: input channels.
    num_classes: logits produced.
    width: channels of every conv (32 in the studies).
    deformable: 'none', 'all' or the number of last convs that are deformable
      (the studies: 2, i.e. conv4 and conv5).
    modulated: DCNv2 masks in the deformable convs (when `conv` is unset).
    conv: which deformable conv: 'dcnv1', 'dcnv2', 'dcnv3' or 'dcnv4' (see the
      module docstring; DCNv3 / DCNv4 replace at most the last 4 convs, the
      width-preserving ones). None: 'dcnv2' if `modulated` else 'dcnv1'.
    dropout: dropout rate before the classifier (0.2 in the COCO study).
    dtype: computation dtype (e.g. bfloat16); parameters stay float32.
    rngs: random number generators for the parameters.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models import ConvClassifier
    >>> model = ConvClassifier(1, 10, deformable=2, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 28, 28, 1), jnp.float32)).shape
    (4, 10)
  """

  num_convs = 5

  def __init__(self, in_features: int = 1, num_classes: int = 10, *, width: int = 32, deformable: int | str = 0,
               modulated: bool = False, conv: str | None = None, dropout: float = 0.0, dtype: DTypeLike | None = None, rngs: nnx.Rngs):
    k = resolve_deformable(deformable, self.num_convs)
    conv = resolve_conv(conv, modulated)
    self.convs = nnx.List([
        _conv(in_features if i == 0 else width, width, 3, 1, i >= self.num_convs - k, conv, dtype, rngs)
        for i in range(self.num_convs)
    ])
    # The dropout key is passed per call (not stored), so the model state is parameters only.
    self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
    self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`x [N, H, W, in_features]` -> logits `[N, num_classes]` (float32).

    With `train=True` and dropout, `rngs` must provide a 'dropout' stream.
    """
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i < 2:
        x = _max_pool(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout is not None:
      x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.head(x).astype(jnp.float32)


class CifarNet(nnx.Module):
  """The CIFAR-10 net of the training-time study: conv 3->40 (3x3) -> max pool ->
  conv 40->25 (2x2) -> avg pool -> FC 300 -> FC 100 -> FC classes, leaky ReLU.

  `deformable` counts from the last conv (1: conv2, 2 or 'all': both). Unlike the
  study's notebook (whose deformable variant padded its convs and so changed the
  feature-map sizes), both variants here use the same VALID geometry. `conv`
  may be 'dcnv1' or 'dcnv2' (its convs change width: DCNv3 / DCNv4 blocks do not fit).
  """

  num_convs = 2

  def __init__(self, in_features: int = 3, num_classes: int = 10, *, image_size: int = 32,
               deformable: int | str = 0, modulated: bool = False, conv: str | None = None,
               dtype: DTypeLike | None = None, rngs: nnx.Rngs):
    k = resolve_deformable(deformable, self.num_convs)
    conv = resolve_conv(conv, modulated)
    self.conv1 = _conv(in_features, 40, 3, 'VALID', k >= 2, conv, dtype, rngs)
    self.conv2 = _conv(40, 25, 2, 'VALID', k >= 1, conv, dtype, rngs)
    side = ((image_size - 2) // 2 - 1) // 2
    self.fc1 = nnx.Linear(25 * side * side, 300, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(300, 100, dtype=dtype, rngs=rngs)
    self.fc3 = nnx.Linear(100, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`x [N, 32, 32, 3]` -> logits `[N, num_classes]` (float32); `train`/`rngs` unused (no dropout)."""
    del train, rngs
    x = _max_pool(jax.nn.leaky_relu(self.conv1(x)))
    x = _avg_pool(jax.nn.leaky_relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.leaky_relu(self.fc1(x))
    x = jax.nn.leaky_relu(self.fc2(x))
    return self.fc3(x).astype(jnp.float32)


MODELS = types.MappingProxyType({'conv5': ConvClassifier, 'cifarnet': CifarNet, 'internimage': InternImage,
                                 'flash_internimage': FlashInternImage})
# The models sized by a preset name (`build_model`'s `preset`), with the presets each accepts.
PRESET_MODELS = types.MappingProxyType({'internimage': INTERNIMAGE_PRESETS,
                                        'flash_internimage': FLASH_INTERNIMAGE_PRESETS})


def build_model(name: str, *, in_features: int, num_classes: int, image_size: int, deformable: int | str,
                modulated: bool, conv: str | None = None, dropout: float = 0.0, dtype: DTypeLike | None = None,
                preset: str = 'micro', rngs: nnx.Rngs) -> nnx.Module:
  """Builds a classifier by name (a key of `MODELS`); `conv` as `ConvClassifier`'s.

  'internimage' and 'flash_internimage' are built at `preset` (a key of `PRESET_MODELS[name]`); they ignore
  `image_size`, `deformable` and `modulated` (every block is deformable) and refuse a `conv` or a `dropout`
  (their stochastic depth is the preset's). The other models ignore `preset`.

  Example:
    >>> from flax import nnx
    >>> from deformjax.models import build_model
    >>> model = nnx.eval_shape(lambda: build_model('internimage', in_features=1, num_classes=10, image_size=28,
    ...                                            deformable='none', modulated=False, rngs=nnx.Rngs(0)))
    >>> model.head.kernel.shape  # 'micro': 128 features, times 1.5 in the conv head
    (192, 10)
  """
  if name == 'conv5':
    return ConvClassifier(in_features, num_classes, deformable=deformable, modulated=modulated, conv=conv,
                          dropout=dropout, dtype=dtype, rngs=rngs)
  if name == 'cifarnet':
    return CifarNet(in_features, num_classes, image_size=image_size, deformable=deformable, modulated=modulated,
                    conv=conv, dtype=dtype, rngs=rngs)
  if name in PRESET_MODELS:
    check_preset_model(name, preset, conv, dropout)
    return MODELS[name](preset, num_classes=num_classes, in_features=in_features, dtype=dtype, rngs=rngs)
  raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def check_preset_model(name: str, preset: str, conv: str | None, dropout: float) -> None:
  """Raises ValueError (naming the argument) for settings an InternImage-family model cannot take."""
  if not isinstance(preset, str) or preset.lower() not in PRESET_MODELS[name]:
    raise ValueError(f"preset must be one of {', '.join(repr(p) for p in PRESET_MODELS[name])} for model "
                     f'{name!r}, got {preset!r}')
  if conv not in (None, ''):
    raise ValueError(f'conv={conv!r} does not apply to model {name!r}: its blocks are all '
                     f"{'DCNv3' if name == 'internimage' else 'DCNv4'}; leave conv unset")
  if dropout:
    raise ValueError(f'dropout={dropout!r} does not apply to model {name!r}: its stochastic depth is the '
                     "preset's drop_path_rate; leave dropout at 0")


__all__ = ['CONVS', 'MODELS', 'PRESET_MODELS', 'CifarNet', 'ConvClassifier', 'Residual', 'build_model',
           'check_preset_model', 'resolve_conv', 'resolve_deformable']
