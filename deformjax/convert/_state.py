"""Reading PyTorch state dicts (numpy arrays keyed by module path) into Flax NNX modules.

Shared by every converter in `deformjax.convert`: the checks that a state dict is flat and that a weight is an
array in the layout the converter expects, each naming the fix; one reader that names the key and the shape it
expected (and the `prefix=` to pass when the keys carry one); the layouts of a parameter table's entries; and the
checks that a module built abstract (`nnx.eval_shape`) got every parameter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.nn.deform_conv import DeformConv

# One row of a parameter table: (PyTorch state-dict key, our variable, layout). Layouts: 'linear' (`[out, in]`
# there, `[in, out]` here), 'conv' (OIHW there, HWIO here), 'same'.
Entry = tuple[str, nnx.Variable, str]
# The keys under which checkpoints commonly nest their state dict.
_CHECKPOINT_KEYS = ('model', 'state_dict', 'module', 'model_state', 'params')
_WRAPPERS = {'module.': ' (a DataParallel / DistributedDataParallel state dict)'}


_V = TypeVar('_V', bound=nnx.Variable)


def present(variable: _V | None, key: str) -> _V:
  """`variable`, a parameter flax declares optional (`use_bias`, `use_scale`), as the entry `key`'s; a ValueError
  naming the entry for a module built without it."""
  if variable is None:
    raise ValueError(f'{key}: the module has no such parameter (built with use_bias=False or use_scale=False?)')
  return variable


def assign(variable: nnx.Variable, value: np.ndarray) -> None:
  """Sets a parameter, also one of an abstract module (`nnx.eval_shape`), which holds no array to write into."""
  variable.set_value(jnp.asarray(value))


def check_state(state: Any, fn: str) -> Mapping[str, Any]:
  """`state` if it is a flat `{name: array}` mapping; else a ValueError / TypeError that names the fix."""
  if not isinstance(state, Mapping):
    shape = f' of shape {np.shape(state)}' if hasattr(state, 'shape') else ''
    raise TypeError(f'{fn}: state must be a state dict {{name: array}} (`{{k: v.numpy() for k, v in '
                    f'module.state_dict().items()}}`), got {type(state).__name__}{shape}')
  for key, value in state.items():
    if not isinstance(value, Mapping):
      continue
    if key in _CHECKPOINT_KEYS:
      raise ValueError(f'{fn}: state[{key!r}] is a dict: a checkpoint holding its state dict under {key!r}? '
                       f'pass state[{key!r}]')
    raise ValueError(f'{fn}: state must be flat {{name: array}} as state_dict() gives, got a nested dict under '
                     f"{key!r}: flatten it to '.'-joined keys (flax.traverse_util.flatten_dict(state, sep='.'))")
  return state


def prefix_hint(state: Mapping[str, Any], prefix: str, key: str) -> str:
  """A hint naming the `prefix=` under which `state` holds `key`, or '' when it holds it under none."""
  heads = sorted({k[:len(k) - len(key)] for k in state
                  if k.endswith(key) and k != prefix + key and (len(k) == len(key) or k[-len(key) - 1] == '.')})
  heads = [h for h in heads if not any(h != other and h.startswith(other) for other in heads)]  # outermost only
  if not heads:
    return ''
  if '' in heads and prefix:
    return f": keys carry no prefix {prefix!r}: pass prefix=''"
  if len(heads) == 1:
    head = heads[0]
    return f': keys look prefixed with {head!r}{_WRAPPERS.get(head, "")}: pass prefix={head!r}'
  return f': {key!r} is under several prefixes: pass prefix= one of {heads[:4]}'


def missing_key(state: Mapping[str, Any], prefix: str, key: str, fn: str, shape: tuple[int, ...] | None = None):
  """The ValueError for `prefix + key` missing from `state`: the key, the shape wanted, the prefix to pass."""
  wanted = '' if shape is None else f' (shape {shape})'
  return ValueError(f'{fn}: state has no {prefix + key!r}{wanted}{prefix_hint(state, prefix, key)}; keys: '
                    f'{sorted(state)[:8]}...')


def one_of(ours: Any, theirs: Any, names: tuple[str, str], default: Any, fn: str) -> Any:
  """The value of an argument that has our name and the source's (`names`): either, not both."""
  if ours is not None and theirs is not None:
    raise TypeError(f"{fn}: pass {names[0]} (the module's name) or {names[1]} (the source's), not both; got "
                    f'{names[0]}={ours!r}, {names[1]}={theirs!r}')
  return default if ours is None and theirs is None else ours if ours is not None else theirs


def _kernel_like(a: int, b: int) -> bool:
  return a == b and a % 2 == 1 and a <= 11


def oihw(weight: Any, name: str, fn: str, fix: str, bias: Any = None) -> np.ndarray:
  """`weight` as a 4-d OIHW array `[C_out, C_in // groups, kh, kw]`, refusing a state dict (naming `fix`) and an
  HWIO weight when the shapes say so: a bias as long as its last axis, or a kernel-sized first pair of axes
  beside channel-sized last ones."""
  if isinstance(weight, Mapping):
    raise TypeError(f'{fn}: {name} must be an OIHW array [C_out, C_in // groups, kh, kw], got a state dict with '
                    f'keys {sorted(weight)[:6]}: {fix}')
  weight = np.asarray(weight)
  if weight.ndim != 4:
    raise ValueError(f'{fn}: {name} must be an OIHW array [C_out, C_in // groups, kh, kw], got shape {weight.shape}')
  s = weight.shape
  by_bias = bias is not None and np.shape(bias) == (s[3],) and s[3] != s[0]
  if by_bias or (_kernel_like(s[0], s[1]) and max(s[2], s[3]) > 11):
    raise ValueError(f'{fn}: {name} must be OIHW [C_out, C_in // groups, kh, kw] (PyTorch\'s layout), got shape {s}, '
                     f'which looks HWIO [kh, kw, C_in, C_out] (Flax\'s): pass {name}.transpose(3, 2, 0, 1)')
  return weight


def to_torch(value: Any, layout: str) -> Any:
  """Our layout -> PyTorch's (`value` an array, or a shape given as a tuple)."""
  if isinstance(value, tuple):
    return to_torch(np.empty(value, np.bool_), layout).shape
  return value.T if layout == 'linear' else value.transpose(3, 2, 0, 1) if layout == 'conv' else value


def from_torch(value: np.ndarray, layout: str) -> np.ndarray:
  """PyTorch's layout -> ours."""
  return value.T if layout == 'linear' else value.transpose(2, 3, 1, 0) if layout == 'conv' else value


def join(key: str, name: str) -> str:
  """`key.name`, or `name` alone under the empty key (a layer's own state dict)."""
  return f'{key}.{name}' if key else name


def linear_entries(key: str, m: nnx.Linear) -> Iterator[Entry]:
  """An `nn.Linear`'s rows: `key.weight [out, in]`, `key.bias` (`weight`, `bias` for the key '')."""
  yield join(key, 'weight'), m.kernel, 'linear'
  if m.bias is not None:
    yield join(key, 'bias'), m.bias, 'same'


def conv_entries(key: str, m: nnx.Conv | DeformConv) -> Iterator[Entry]:
  """A `Conv2d`'s rows: `key.weight` OIHW, `key.bias`."""
  yield join(key, 'weight'), m.kernel, 'conv'
  if m.bias is not None:
    yield join(key, 'bias'), m.bias, 'same'


def norm_entries(key: str, m: nnx.LayerNorm | nnx.GroupNorm | nnx.BatchNorm) -> Iterator[Entry]:
  """A norm's rows: `key.weight` (our scale), `key.bias`, and a BatchNorm's running statistics."""
  yield f'{key}.weight', present(m.scale, f'{key}.weight'), 'same'
  yield f'{key}.bias', present(m.bias, f'{key}.bias'), 'same'
  if isinstance(m, nnx.BatchNorm):
    yield f'{key}.running_mean', m.mean, 'same'
    yield f'{key}.running_var', m.var, 'same'


class StateReader:
  """Reads `prefix + key` from a numpy state dict, naming the key and the expected shape when it is wrong.

  Every key read is recorded, so that `check_all_used` can refuse entries the module has no parameter for.
  """

  def __init__(self, state: Mapping[str, np.ndarray], prefix: str, fn: str, param_dtype):
    self.state, self.prefix, self.fn, self.dtype = check_state(state, fn), prefix, fn, param_dtype
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return self.prefix + key in self.state

  def get(self, key: str, shape: tuple[int, ...], layout: str = 'same') -> np.ndarray:
    """Entry `key`, of `shape` (PyTorch's layout), cast to the parameters' dtype; named when missing or misshapen,
    with the transpose when it is in Flax's layout instead."""
    full = self.prefix + key
    if full not in self.state:
      raise missing_key(self.state, self.prefix, key, self.fn, shape)
    value = np.asarray(self.state[full])
    if value.shape != shape:
      flax_layout = layout != 'same' and value.shape == from_torch(np.empty(shape, np.bool_), layout).shape
      hint = (f" (Flax's layout: pass {key}.{'T' if layout == 'linear' else 'transpose(3, 2, 0, 1)'})"
              if flax_layout else '')
      raise ValueError(f'{self.fn}: {full!r} must have shape {shape}, got {value.shape}{hint}')
    self.used.add(full)
    return value.astype(self.dtype)

  def shape(self, key: str) -> tuple[int, ...]:
    """The shape of entry `key`, refused by name (with the `prefix=` to pass) when it is missing."""
    if not self.has(key):
      raise missing_key(self.state, self.prefix, key, self.fn)
    return tuple(np.shape(self.state[self.prefix + key]))

  def linear_shape(self, key: str) -> tuple[int, int]:
    """`(out, in)` of the `nn.Linear` weight `key`, refused by name when missing or not 2-d."""
    shape = self.shape(key)
    if len(shape) != 2:
      raise ValueError(f'{self.fn}: {self.prefix + key!r} must be an nn.Linear weight [out, in], got shape {shape}')
    return int(shape[0]), int(shape[1])

  def load(self, entries: Iterator[Entry] | list[Entry]) -> None:
    """Sets each entry's variable from `key` (PyTorch's layout, checked against the variable's shape)."""
    for key, variable, layout in entries:
      assign(variable, from_torch(self.get(key, to_torch(tuple(variable.shape), layout), layout), layout))

  def linear(self, module: nnx.Linear, key: str) -> None:
    """`nn.Linear` `key.weight [out, in]`, `key.bias [out]` -> `module.kernel [in, out]`, `module.bias`."""
    self.load(linear_entries(key, module))

  def depthwise(self, module: nnx.Conv, key: str) -> None:
    """Depthwise `Conv2d` `key.weight [C, 1, k, k]` -> HWIO `[k, k, 1, C]`."""
    self.load(conv_entries(key, module))

  def check_all_used(self, hint: str = 'check the configuration and the prefix', what: str = 'layer') -> None:
    left = sorted(k for k in self.state if k.startswith(self.prefix) and k not in self.used)
    if left:
      raise ValueError(f'{self.fn}: state entries the {what} has no parameter for: {left[:8]} (a different '
                       f'configuration? {hint})')


def check_concrete(module: nnx.Module, fn: str) -> None:
  """Every variable of a module built abstract has been given an array (a guard against a missed parameter)."""
  left = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module))
          if isinstance(leaf, jax.ShapeDtypeStruct)]
  if left:
    raise AssertionError(f'{fn}: parameters left unset: {left[:8]}')


def seed_rng_streams(module: nnx.Module, seed: int = 0) -> None:
  """Concrete dropout streams for a module built abstract: one key per stream, folded from `seed`."""
  base = jax.random.key(seed)
  for i, (_, node) in enumerate(nnx.iter_graph(module)):
    if isinstance(node, nnx.RngKey):
      node.set_value(jax.random.fold_in(base, i))
    elif isinstance(node, nnx.RngCount):
      node.set_value(jnp.zeros((), jnp.uint32))


__all__ = ['Entry', 'StateReader', 'assign', 'check_concrete', 'check_state', 'conv_entries', 'from_torch', 'join',
           'linear_entries', 'missing_key', 'norm_entries', 'oihw', 'one_of', 'prefix_hint', 'present',
           'seed_rng_streams', 'to_torch']
