"""Sphinx configuration of the deformjax documentation.

Builds offline (no intersphinx, notebooks rendered from their stored outputs) and is
meant to run with warnings as errors: ``bash docs/build.sh``.
"""

from __future__ import annotations

import inspect
import logging
import pathlib
import shutil
import sys
import tomllib

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / '_ext'))

from public_api import public_modules, public_names  # noqa: E402

import deformjax  # noqa: E402

project = 'deformjax'
author = 'The deformjax authors'
copyright = 'The deformjax authors'
release = deformjax.__version__
version = release

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
    'coverage_check',
    'house_style',
]

# Pages that appear only once they exist: the changelog once the repository has one,
# the API page of a module that fails to import is a build error (not excluded).
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', '**.ipynb_checkpoints', 'README.md']
if not (ROOT / 'CHANGELOG.md').exists():
  exclude_patterns.append('changelog.md')

# Single backticks in docstrings (the house style) are Python references: a link where
# the name resolves, code either way.
default_role = 'py:obj'
nitpicky = False
# Optional pages (the family's, export, changelog) enter the toctrees by glob once they exist;
# `setup` below keeps a glob that matches nothing yet from failing the build.

# -- autodoc / autosummary / napoleon -----------------------------------------------------
autosummary_generate = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
maximum_signature_line_length = 100
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# One entry per Args line, so `strides, padding, ...: as nnx.Conv` stays one entry, not one copy per name.
napoleon_use_param = False
napoleon_use_ivar = True

# -- MyST / myst-nb -------------------------------------------------------------------
myst_enable_extensions = ['colon_fence', 'deflist', 'dollarmath']
myst_heading_anchors = 3
nb_execution_mode = 'off'  # stored outputs: the build needs no kernel
nb_merge_streams = True
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb', '.ipynb': 'myst-nb'}

# -- HTML -------------------------------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = f'deformjax {release}'
html_static_path = []
html_theme_options = {
    'show_toc_level': 2,
    'home_page_in_toc': True,
    'use_download_button': True,
    'navigation_with_keys': False,
}


def _project_urls() -> dict[str, str]:
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f).get('project', {}).get('urls', {})


# The repository button only when the package declares where it lives.
_urls = {k.lower(): v for k, v in _project_urls().items()}
_repo = _urls.get('repository') or _urls.get('source') or _urls.get('homepage')
if _repo:
  html_theme_options.update(repository_url=_repo, use_repository_button=True, use_issues_button=True)


# -- Notebooks -------------------------------------------------------------------------
# The notebooks live in the repository's notebooks/ (where Colab opens them); each build copies
# them into docs/notebooks/ (git-ignored), so the site renders exactly the stored outputs.
def _copy_notebooks() -> None:
  target = DOCS / 'notebooks'
  target.mkdir(exist_ok=True)
  sources = {nb.name: nb for nb in sorted((ROOT / 'notebooks').glob('*.ipynb'))}
  for stale in target.glob('*.ipynb'):
    if stale.name not in sources:
      stale.unlink()
  for name, nb in sources.items():
    shutil.copyfile(nb, target / name)


_copy_notebooks()


# -- API pages for public modules that have no hand-written page ----------------------------
# A hand-written page (api/<module>.rst) groups names for reading; a public module that lands
# without one still gets a complete reference, generated here from its __all__.
def _kind(obj) -> str:
  if inspect.isclass(obj):
    return 'autoexception' if issubclass(obj, BaseException) else 'autoclass'
  if callable(obj):
    return 'autofunction'
  return 'py:data'  # autodata would show the docstring of the value's type


# What each module holds and needs, for the table on the API reference's first page; a module
# missing here is described by the first line of its docstring.
MODULE_SUMMARIES = {
    'deformjax': ('the package: its version and the two subpackages it imports', 'jax, flax, numpy'),
    'deformjax.ops': ('pure functions on `jax.Array`: the sampler, the deformable ops, execution settings',
                      'jax, numpy'),
    'deformjax.nn': ('Flax NNX modules wrapping the ops', 'flax'),
    'deformjax.nn.linen': ('their Linen twins', 'flax'),
    'deformjax.models': ("the studies' small classifiers with a regular / deformable switch; InternImage and "
                         'FlashInternImage; the Deformable DETR detector and its ResNet backbones', 'flax'),
    'deformjax.convert': ('PyTorch checkpoints and trained Flax convs into deformjax modules, by source', 'flax, numpy'),
    'deformjax.detection': ('boxes, Hungarian matching, the Deformable DETR loss, post-processing, COCO evaluation',
                            'the `detection` extra'),
    'deformjax.data': ('datasets and geometric augmentation', 'the `data` extra'),
    'deformjax.train': ('the sharded training loop, configs, checkpoints', 'the `train` extra'),
    'deformjax.viz': ('sampling-location plots, effective dilation, result curves', 'matplotlib'),
    'deformjax.export': ('ONNX export in standard operators', 'the `onnx` extra'),
}


def _generate_api_pages() -> None:
  """The module table, and a page for every public module that has no hand-written one."""
  out = DOCS / 'api' / 'generated'
  out.mkdir(exist_ok=True)
  for stale in [*out.glob('*.rst'), *out.glob('*.inc'), *out.glob('*.md')]:
    stale.unlink()
  modules = public_modules()
  rows = ['| module | what it holds | needs |', '|---|---|---|']
  order = list(MODULE_SUMMARIES)
  for name, module in sorted(modules.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                                              kv[0])):
    what, needs = MODULE_SUMMARIES.get(name, ((module.__doc__ or '').strip().split('\n')[0], ''))
    rows.append(f'| {{doc}}`{name} <{name}>` | {what} | {needs} |')
  (out / 'modules_table.inc').write_text('\n'.join(rows) + '\n')
  # A hand-written page of a module that is not there (yet) stays out of the build.
  exclude_patterns.extend(f'api/{page.stem}.rst' for page in (DOCS / 'api').glob('deformjax*.rst')
                          if page.stem not in modules)
  for name, module in sorted(modules.items()):
    if (DOCS / 'api' / f'{name}.rst').exists():
      continue
    lines = [name, '=' * len(name), '', f'.. automodule:: {name}', '', f'.. currentmodule:: {name}', '',
             '.. autosummary::', '']
    names = public_names(module)
    lines += [f'   {n}' for n in names if _kind(getattr(module, n)) != 'py:data'] + ['']
    for n in names:
      obj = getattr(module, n)
      if isinstance(obj, type(deformjax)):
        continue
      kind = _kind(obj)
      lines.append(f'.. {kind}:: {n}')
      if kind == 'autoclass':
        lines += ['   :members:', '   :special-members: __call__']
      elif kind == 'py:data':
        lines.append(f'   :type: {type(obj).__name__}')
      lines.append('')
    (out / f'{name}.rst').write_text('\n'.join(lines))


_generate_api_pages()


class _EmptyGlobFilter(logging.Filter):
  """Drops "toctree glob pattern ... didn't match any documents": an optional page not there yet.

  Sphinx logs it without a warning type, so `suppress_warnings = ['toc.empty_glob']` cannot
  reach it; every other warning still fails the build.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return getattr(record, 'subtype', None) != 'empty_glob'


def setup(app) -> None:
  for handler in logging.getLogger('sphinx').handlers:
    handler.filters.insert(0, _EmptyGlobFilter())
