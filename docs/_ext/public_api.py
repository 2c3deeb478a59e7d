"""What is public in deformjax: the one definition the API reference and the API tests both use.

A module is public when no component of its dotted path starts with ``_`` and it is
``deformjax`` itself, a package under it, a module directly under ``deformjax``
(``deformjax.export``), or a module a public package lists in its own ``__all__``
(``deformjax.nn.linen``, ``deformjax.convert``); so a new subpackage or top-level module is
covered the day it lands. Its public names are its ``__all__`` (a public module without one
contributes the classes and functions it defines whose names do not start with ``_``).
Every other module (``deformjax.nn.dcnv3``, ``deformjax.ops.sampling``) is an implementation
module: what it exports reaches users through a public module, and only that way.

``docs/_ext/coverage_check.py`` fails the documentation build when a public name has no
entry in the API reference; ``tests/test_api.py`` checks the same names' docstrings and type
hints. Needs nothing but the package itself (no Sphinx).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from collections.abc import Iterator

ROOT = 'deformjax'


def _import(name: str, missing_ok: bool) -> types.ModuleType | None:
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if missing_ok and e.name and not e.name.startswith(ROOT):
      return None
    raise


def _is_public(dotted: str) -> bool:
  """No component of the dotted path is private.

  Example:
    >>> _is_public('deformjax.convert'), _is_public('deformjax.ops._policy')
    (True, False)
  """
  return not any(part.startswith('_') for part in dotted.split('.'))


def public_modules(root: str = ROOT, missing_ok: bool = False) -> dict[str, types.ModuleType]:
  """Every public module of the package, by dotted name (see the module docstring for the rule).

  With `missing_ok`, a module whose optional dependencies are not installed (the `[train]` extra, say) is left out
  instead of raising, as the tests need on a machine with the core dependencies only.

  Example:
    >>> modules = public_modules()
    >>> 'deformjax.nn.linen' in modules, 'deformjax.ops.sampling' in modules, 'deformjax.ops._policy' in modules
    (True, False, False)
    >>> 'deformjax.ops.dcnv3' in modules  # a function of deformjax.ops, not a public module
    False
  """
  found: dict[str, types.ModuleType] = {}
  pending = [root]
  while pending:
    module = _import(pending.pop(), missing_ok)
    if module is None or module.__name__ in found:
      continue
    found[module.__name__] = module
    listed = set(getattr(module, '__all__', ()))
    for info in pkgutil.iter_modules(getattr(module, '__path__', ())):
      dotted = f'{module.__name__}.{info.name}'
      # A listed name counts as a module only when it is one: `deformjax.ops.dcnv3` is a function
      # that shadows the submodule of that name.
      listed_module = info.name in listed and isinstance(getattr(module, info.name, None), types.ModuleType)
      if _is_public(dotted) and (info.ispkg or module.__name__ == root or listed_module):
        pending.append(dotted)
  return found


def public_names(module: types.ModuleType) -> list[str]:
  """`module.__all__`, or the public classes and functions it defines when it has none."""
  if hasattr(module, '__all__'):
    return list(module.__all__)
  return [name for name, obj in vars(module).items()
          if not name.startswith('_') and (inspect.isclass(obj) or inspect.isfunction(obj))
          and obj.__module__ == module.__name__]


def public_symbols(root: str = ROOT, missing_ok: bool = False) -> Iterator[tuple[str, bool]]:
  """(dotted name, is a module) for every public name."""
  for module_name, module in sorted(public_modules(root, missing_ok).items()):
    for name in public_names(module):
      yield f'{module_name}.{name}', isinstance(getattr(module, name, None), types.ModuleType)
