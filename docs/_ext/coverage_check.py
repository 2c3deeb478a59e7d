"""Fails the build when a public name of deformjax has no entry in the API reference.

The public names are the ``__all__`` of every public module. A module is public when
no component of its dotted path starts with ``_`` and it is ``deformjax`` itself, a
package under it, a module directly under ``deformjax`` (``deformjax.export``), or a
module a public package lists in its own ``__all__`` (``deformjax.nn.linen``,
``deformjax.nn.convert``); so a new subpackage or top-level module is covered the day it
lands. A public module without ``__all__`` contributes the
classes and functions it defines whose names do not start with ``_``.

A name counts as documented when the Python domain holds it under the public
module's path, e.g. ``deformjax.ops.deform_conv2d`` (``.. currentmodule::
deformjax.ops`` + ``.. autofunction:: deform_conv2d``); a listed submodule counts
when its ``.. automodule::`` / ``.. module::`` is in the reference.

Runs as the ``coverage_check`` builder (``sphinx-build -b coverage_check``), as
optax's docs do, and as a warning in every other build once all pages are read, so the
HTML build of ``docs/build.sh`` (warnings as errors) fails on a missing entry.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from collections.abc import Iterator
from typing import Any

from sphinx import application, builders, errors
from sphinx.util import logging

logger = logging.getLogger(__name__)

ROOT = 'deformjax'


def _is_public(dotted: str) -> bool:
  """No component of the dotted path is private.

  Example:
    >>> _is_public('deformjax.nn.convert'), _is_public('deformjax.ops._policy')
    (True, False)
  """
  return not any(part.startswith('_') for part in dotted.split('.'))


def public_modules(root: str = ROOT) -> dict[str, types.ModuleType]:
  """Every public module of the package, by dotted name (see the module docstring for the rule).

  Example:
    >>> modules = public_modules()
    >>> 'deformjax.nn.linen' in modules, 'deformjax.ops.sampling' in modules, 'deformjax.ops._policy' in modules
    (True, False, False)
    >>> 'deformjax.ops.dcnv3' in modules  # a function of deformjax.ops, not a public module
    False
  """
  found: dict[str, types.ModuleType] = {}
  pending = [importlib.import_module(root)]
  while pending:
    module = pending.pop()
    if module.__name__ in found:
      continue
    found[module.__name__] = module
    listed = set(getattr(module, '__all__', ()))
    for info in pkgutil.iter_modules(getattr(module, '__path__', ())):
      dotted = f'{module.__name__}.{info.name}'
      # A listed name counts as a module only when it is one: `deformjax.ops.dcnv3` is a function
      # that shadows the submodule of that name.
      listed_module = info.name in listed and isinstance(getattr(module, info.name, None), types.ModuleType)
      if _is_public(dotted) and (info.ispkg or module.__name__ == root or listed_module):
        pending.append(importlib.import_module(dotted))
  return found


def public_names(module: types.ModuleType) -> list[str]:
  """`module.__all__`, or the public classes and functions it defines when it has none."""
  if hasattr(module, '__all__'):
    return list(module.__all__)
  return [name for name, obj in vars(module).items()
          if not name.startswith('_') and (inspect.isclass(obj) or inspect.isfunction(obj))
          and obj.__module__ == module.__name__]


def public_symbols(root: str = ROOT) -> Iterator[tuple[str, bool]]:
  """(dotted name, is a module) for every public name."""
  for module_name, module in sorted(public_modules(root).items()):
    for name in public_names(module):
      yield f'{module_name}.{name}', isinstance(getattr(module, name, None), types.ModuleType)


def undocumented(env) -> list[str]:
  py = env.domaindata['py']
  objects, modules = frozenset(py['objects']), frozenset(py['modules'])
  return sorted(name for name, is_module in public_symbols()
                if name not in (modules if is_module else objects) and name not in objects)


def _message(missing: list[str]) -> str:
  pages = sorted({name.rsplit('.', 1)[0] for name in missing})
  return ('every public name must have an entry in the API reference (docs/api/<module>.rst: an autosummary '
          f'line and an auto* directive on the page of {", ".join(pages)}); undocumented: {", ".join(missing)}')


class CoverageCheck(builders.Builder):
  """A builder that writes nothing and fails when a public name is undocumented."""

  name = 'coverage_check'
  epilog = 'Every public name of deformjax is in the API reference.'

  def get_outdated_docs(self) -> str:
    return 'coverage_check'

  def get_target_uri(self, docname: str, typ: str | None = None) -> str:
    return ''

  def prepare_writing(self, docnames) -> None:
    pass

  def write_doc(self, docname, doctree) -> None:
    pass

  def finish(self) -> None:
    missing = undocumented(self.env)
    if missing:
      raise errors.SphinxError(_message(missing))


def _check_consistency(app: application.Sphinx, env) -> None:
  # Every builder reads all documents first; a warning here fails a -W build of any kind.
  if app.builder.name != CoverageCheck.name:
    missing = undocumented(env)
    if missing:
      logger.warning(_message(missing), type='deformjax', subtype='api_coverage')


def setup(app: application.Sphinx) -> dict[str, Any]:
  app.add_builder(CoverageCheck)
  app.connect('env-check-consistency', _check_consistency)
  return {'version': '1', 'parallel_read_safe': True, 'parallel_write_safe': True}
