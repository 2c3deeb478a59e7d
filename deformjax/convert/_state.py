"""Reading PyTorch state dicts (numpy arrays keyed by module path) into Flax NNX modules.

Shared by every converter in `deformjax.convert`: one reader that names the key and the shape it expected,
and the checks that a module built abstract (`nnx.eval_shape`) got every parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def assign(variable: nnx.Variable, value: np.ndarray) -> None:
  """Sets a parameter, also one of an abstract module (`nnx.eval_shape`), which holds no array to write into."""
  variable.set_value(jnp.asarray(value))


class StateReader:
  """Reads `prefix + key` from a numpy state dict, naming the key and the expected shape when it is wrong.

  Every key read is recorded, so that `check_all_used` can refuse entries the module has no parameter for.
  """

  def __init__(self, state: Mapping[str, np.ndarray], prefix: str, fn: str, param_dtype):
    self.state, self.prefix, self.fn, self.dtype = state, prefix, fn, param_dtype
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return self.prefix + key in self.state

  def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    full = self.prefix + key
    if full not in self.state:
      raise ValueError(f'{self.fn}: state has no {full!r} (shape {shape}); keys: {sorted(self.state)[:8]}...')
    value = np.asarray(self.state[full])
    if value.shape != shape:
      raise ValueError(f'{self.fn}: {full!r} must have shape {shape}, got {value.shape}')
    self.used.add(full)
    return value.astype(self.dtype)

  def linear(self, module: nnx.Linear, key: str) -> None:
    """`nn.Linear` `key.weight [out, in]`, `key.bias [out]` -> `module.kernel [in, out]`, `module.bias`."""
    assign(module.kernel, self.get(f'{key}.weight', (module.out_features, module.in_features)).T)
    if module.bias is not None:
      assign(module.bias, self.get(f'{key}.bias', (module.out_features,)))

  def depthwise(self, module: nnx.Conv, key: str) -> None:
    """Depthwise `Conv2d` `key.weight [C, 1, k, k]` -> HWIO `[k, k, 1, C]`."""
    kh, kw, _, c = module.kernel.shape
    assign(module.kernel, self.get(f'{key}.weight', (c, 1, kh, kw)).transpose(2, 3, 1, 0))
    assign(module.bias, self.get(f'{key}.bias', (c,)))

  def check_all_used(self, hint: str = 'check the configuration and the prefix') -> None:
    left = sorted(k for k in self.state if k.startswith(self.prefix) and k not in self.used)
    if left:
      raise ValueError(f'{self.fn}: state entries the module has no parameter for: {left[:8]} (a different '
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
