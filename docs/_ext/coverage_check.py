"""Fails the build when a public name of deformjax has no entry in the API reference.

What is public is defined once, in ``public_api.py`` (beside this file), which
``tests/test_api.py`` uses too.

A name counts as documented when the Python domain holds it under the public
module's path, e.g. ``deformjax.ops.deform_conv2d`` (``.. currentmodule::
deformjax.ops`` + ``.. autofunction:: deform_conv2d``); a listed submodule counts
when its ``.. automodule::`` / ``.. module::`` is in the reference.

Runs as the ``coverage_check`` builder (``sphinx-build -b coverage_check``), as
optax's docs do, and as a warning in every other build once all pages are read, so the
HTML build of ``docs/build.sh`` (warnings as errors) fails on a missing entry.
"""

from __future__ import annotations

from typing import Any

from public_api import public_symbols
from sphinx import application, builders, errors
from sphinx.util import logging

logger = logging.getLogger(__name__)


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
