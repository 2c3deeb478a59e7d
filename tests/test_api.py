"""The public API as a user meets it: intentional names, docstrings, type hints, scoped execution settings,
and packaging metadata that agrees with what the notebooks and the console script use.

The module checks walk every module of the package (found on disk, imported by each test), so a failure names
the module and the offending names; a module whose optional dependencies are not installed is skipped.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import json
import pathlib
import re
import shlex
import sys
import threading
import tomllib
import types
import warnings

import pytest

import deformjax
from deformjax.ops import _policy

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'deformjax'
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def _module_names() -> list[str]:
  names = []
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    if parts[-1] == '__main__':  # running it is the program, not an import
      continue
    names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


MODULES = _module_names()


def _import(name: str) -> types.ModuleType:
  """The module, or a skip naming the optional dependency it needs (e.g. the [train] extra)."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name and not e.name.startswith('deformjax'):
      pytest.skip(f'{name} needs {e.name}, not installed here')
    raise


def _exported(module: types.ModuleType) -> list[str]:
  """`__all__`, or (where it is missing, which its own test reports) every name the module defines without `_`,
  so that the other checks still judge the module."""
  exported = getattr(module, '__all__', None)
  if exported is None:
    return [n for n in _top_level_names(_path_of(module.__name__)) if not n.startswith('_')]
  return list(exported)


def _load_public_api() -> types.ModuleType:
  """docs/_ext/public_api.py: the definition of public that the API reference's coverage check uses too."""
  spec = importlib.util.spec_from_file_location('public_api', ROOT / 'docs' / '_ext' / 'public_api.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


public_api = _load_public_api()
# Public modules whose optional dependencies are installed here (the others' tests would skip anyway).
_PUBLIC = public_api.public_modules(missing_ok=True)
PUBLIC_MODULES = sorted(_PUBLIC)
# What the public modules show users, by identity: an implementation module's export must be one of these.
_SHOWN = frozenset(id(getattr(m, n, None)) for m in _PUBLIC.values() for n in public_api.public_names(m))


def _is_api_object(obj: object) -> bool:
  """Modules, classes and functions: the objects a docstring and type hints belong to."""
  return inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)


def _own_doc(obj: object) -> str | None:
  """The object's own docstring (a dataclass' generated `Name(field, ...)` text does not count)."""
  doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
  if inspect.isclass(obj) and doc and doc.startswith(f'{obj.__name__}('):
    return None
  return doc.strip() if doc else None


def test_every_module_is_found():
  assert {'deformjax', 'deformjax.ops', 'deformjax.ops.roi_pool', 'deformjax.nn.deform_conv'} <= set(MODULES)


def _none_found(check: str, name: str, found: list[str]) -> None:
  """Fails naming the module, the check and every offending name `check` found in module `name`."""
  assert not found, f'{name}: {check}: {sorted(found)}'


@pytest.mark.parametrize('name', MODULES)
def test_module_declares_all_and_every_name_resolves(name):
  module = _import(name)
  _none_found('no __all__', name, [] if hasattr(module, '__all__') else ['__all__'])
  if not hasattr(module, '__all__'):
    return
  exported = list(module.__all__)
  assert len(exported) == len(set(exported)), f'{name}.__all__ lists a name twice'
  missing = [n for n in exported if not hasattr(module, n)]
  assert not missing, f'{name}.__all__ names what the module does not define: {missing}'


@pytest.mark.parametrize('name', PUBLIC_MODULES)
def test_exported_names_have_docstrings(name):
  module = _import(name)
  assert _own_doc(module), f'{name} has no module docstring'
  _none_found('exported without a docstring', name, [
      n for n in _exported(module) if _is_api_object(getattr(module, n)) and not _own_doc(getattr(module, n))])


def _top_level_names(path: pathlib.Path) -> list[str]:
  """Names a module defines itself (functions, classes, assignments), not the names it imports."""
  names = []
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.append(node.name)
    elif isinstance(node, ast.Assign):
      names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names.append(node.target.id)
  return names


def _path_of(name: str) -> pathlib.Path:
  path = ROOT.joinpath(*name.split('.'))
  return path / '__init__.py' if path.is_dir() else path.with_suffix('.py')


@pytest.mark.parametrize('name', MODULES)
def test_private_helpers_are_underscored(name):
  """Every name a module defines is either exported or starts with `_`."""
  module = _import(name)
  exported = set(getattr(module, '__all__', ()))  # without __all__ nothing is declared public
  _none_found('defined, not in __all__ and not underscored', name,
               [n for n in _top_level_names(_path_of(name)) if not n.startswith('_') and n not in exported])


def _implementation_modules() -> list[str]:
  return [m for m in MODULES if m not in _PUBLIC and not any(p.startswith('_') for p in m.split('.'))]


@pytest.mark.parametrize('name', _implementation_modules())
def test_an_implementation_module_exports_only_what_a_public_module_shows(name):
  """`__all__` is what the API reference shows: a name exported by an implementation module (`deformjax.nn.dcnv3`)
  reaches users through a public module (`deformjax.nn`), or it is a private helper and starts with `_`."""
  module = _import(name)
  _none_found('exported, not shown by a public module', name,
               [n for n in getattr(module, '__all__', ()) if id(getattr(module, n)) not in _SHOWN])


def _unannotated(fn: object, skip_return: bool = False) -> list[str]:
  """Parameters (and `return`) of `fn` without a type hint."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return []
  missing = [p.name for i, p in enumerate(sig.parameters.values())
             if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ('self', 'cls'))]
  if not skip_return and sig.return_annotation is inspect.Signature.empty:
    missing.append('return')
  return missing


def _public_methods(cls: type) -> dict[str, object]:
  """Methods a deformjax class defines itself: public ones, `__init__` and `__call__`."""
  out = {}
  for attr, value in vars(cls).items():
    if attr.startswith('_') and attr not in ('__init__', '__call__'):
      continue
    if isinstance(value, (staticmethod, classmethod)):
      value = value.__func__
    if inspect.isfunction(value) and value.__qualname__.startswith(cls.__qualname__ + '.'):
      out[attr] = value
  return out


def _dataclass_like(cls: type) -> bool:
  """Dataclasses and named tuples: their generated methods carry the field annotations."""
  return hasattr(cls, '__dataclass_fields__') or (issubclass(cls, tuple) and hasattr(cls, '_fields'))


@pytest.mark.parametrize('name', PUBLIC_MODULES)
def test_public_functions_and_methods_have_type_hints(name):
  """Every argument and the return of every exported function, and of the public methods of exported classes.

  One offender per argument (or `return`) without a hint: `function(arg)`, `Class.method(arg)`.
  """
  module = _import(name)
  problems = []
  for n in _exported(module):
    obj = getattr(module, n)
    if getattr(obj, '__module__', '').split('.')[0] != 'deformjax':
      continue  # a re-export from another library
    if inspect.isfunction(obj):
      problems += [f'{n}({arg})' for arg in _unannotated(obj)]
    elif inspect.isclass(obj) and not _dataclass_like(obj):
      for attr, method in _public_methods(obj).items():
        problems += [f'{n}.{attr}({arg})' for arg in _unannotated(method, skip_return=attr == '__init__')]
  _none_found('without type hints', name, problems)


@pytest.mark.parametrize('name', MODULES)
def test_nothing_mutable_is_exported(name):
  """An exported list, dict, set or bytearray can be changed by any importer; settings live in scopes."""
  module = _import(name)
  _none_found('exports a mutable value', name,
               [n for n in _exported(module) if isinstance(getattr(module, n), (list, dict, set, bytearray))])


def test_the_module_checks_find_a_planted_offence(tmp_path):
  """The finders the module checks use report what they look for, so a module that passes has none of it."""
  planted = tmp_path / 'planted.py'
  planted.write_text('import os\nX = 1\nY: int = 2\n_z = 3\n\n\ndef f(a, b: int):\n  pass\n\n\nclass C:\n  pass\n')
  assert _top_level_names(planted) == ['X', 'Y', '_z', 'f', 'C']

  def f(a, b: int):
    pass

  class C:
    def method(self, x: int):
      pass

  assert _unannotated(f) == ['a', 'return'] and list(_public_methods(C)) == ['method']
  assert _own_doc(C) is None and _own_doc(f) is None and _own_doc(_none_found)
  with pytest.raises(AssertionError, match=r"^planted: a check: \['a', 'b'\]"):
    _none_found('a check', 'planted', ['b', 'a'])


# --- execution settings: the accelerator memory budget as a scope -------------------------------------------


def test_budget_default_and_nesting():
  from deformjax.ops import DEFAULT_ACCELERATOR_MEMORY_BUDGET, accelerator_memory_budget
  from deformjax.ops import current_accelerator_memory_budget as current

  assert current() == DEFAULT_ACCELERATOR_MEMORY_BUDGET == 2**30
  with accelerator_memory_budget(2**20) as outer:
    assert outer == 2**20 and current() == 2**20
    assert _policy.pixels_per_pass(1024, None, None, 'accelerator') == 2**10
    with accelerator_memory_budget(2**12):
      assert current() == 2**12
      assert _policy.pixels_per_pass(1024, None, None, 'accelerator') == 4
    assert current() == 2**20
  assert current() == DEFAULT_ACCELERATOR_MEMORY_BUDGET


def test_budget_scope_unwinds_on_exceptions():
  from deformjax.ops import accelerator_memory_budget, current_accelerator_memory_budget

  with pytest.raises(RuntimeError, match='inside'), accelerator_memory_budget(123):
    with accelerator_memory_budget(456):
      raise RuntimeError('inside')
  assert current_accelerator_memory_budget() == 2**30


def test_budget_scopes_are_per_thread():
  """Two threads with overlapping scopes each see their own budget, and the main thread sees neither."""
  from deformjax.ops import accelerator_memory_budget, current_accelerator_memory_budget

  both_open, seen, errors = threading.Barrier(3), {}, []

  def worker(nbytes):
    try:
      with accelerator_memory_budget(nbytes):
        both_open.wait(timeout=30)  # every scope is open now
        seen[nbytes] = (current_accelerator_memory_budget(), _policy.pixels_per_pass(1, None, None, 'accelerator'))
        both_open.wait(timeout=30)
    except Exception as e:  # reported to the main thread
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(n,)) for n in (2**20, 3 * 2**20)]
  for t in threads:
    t.start()
  both_open.wait(timeout=30)
  main_view = current_accelerator_memory_budget()
  both_open.wait(timeout=30)
  for t in threads:
    t.join(timeout=30)
  assert not errors
  assert seen == {2**20: (2**20, 2**20), 3 * 2**20: (3 * 2**20, 3 * 2**20)}
  assert main_view == 2**30


def test_budget_scopes_are_per_asyncio_task():
  from deformjax.ops import accelerator_memory_budget, current_accelerator_memory_budget

  async def task(nbytes, ready, go):
    with accelerator_memory_budget(nbytes):
      ready.set()
      await go.wait()
      return current_accelerator_memory_budget()

  async def main():
    go = asyncio.Event()
    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(task(n, r, go)) for n, r in zip((10, 20), ready)]
    for r in ready:
      await r.wait()
    go.set()
    return await asyncio.gather(*tasks)

  assert asyncio.run(main()) == [10, 20]


@pytest.mark.parametrize('nbytes', [0, -1, 1.5, True, None, '1GiB'])
def test_budget_refuses_what_is_not_a_positive_int(nbytes):
  from deformjax.ops import accelerator_memory_budget, current_accelerator_memory_budget

  with pytest.raises(ValueError, match=r'accelerator_memory_budget: nbytes must be a positive int'):
    with accelerator_memory_budget(nbytes):
      pass
  assert current_accelerator_memory_budget() == 2**30


def test_a_missing_setting_is_an_attribute_error_naming_the_module():
  import deformjax.ops as ops

  for module, name in ((ops, 'deformjax.ops'), (_policy, 'deformjax.ops._policy')):
    with pytest.raises(AttributeError, match=f"module '{re.escape(name)}' has no attribute 'NO_SUCH_SETTING'"):
      module.NO_SUCH_SETTING  # noqa: B018


def test_single_pass_scope_is_one_plan_capped_only_by_explicit_arguments():
  with _policy.single_pass():
    assert _policy.pixels_per_pass(1024, None, None, 'cpu') == _policy.SINGLE_PASS_PIXELS
    assert _policy.pixels_per_pass(1024, 7, None, 'accelerator') == 7
    assert _policy.pixels_per_pass(1024, None, 10 * 1024, 'cpu') == 10
    assert _policy.by_platform(lambda: 'cpu', lambda: 'accelerator') == 'accelerator'
  assert _policy.pixels_per_pass(1024, None, None, 'cpu') == _policy.CPU_CHUNK_BYTES // 1024


# --- packaging ------------------------------------------------------------------------------------------------


def test_one_version_source():
  project = PYPROJECT['project']
  assert 'version' not in project and 'version' in project['dynamic']
  assert PYPROJECT['tool']['setuptools']['dynamic']['version'] == {'attr': 'deformjax.__version__'}
  assert re.fullmatch(r'\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?', deformjax.__version__)
  changelog = (ROOT / 'CHANGELOG.md').read_text()
  assert '## [Unreleased]' in changelog


def test_py_typed_is_shipped():
  assert (PACKAGE / 'py.typed').is_file()
  assert 'py.typed' in PYPROJECT['tool']['setuptools']['package-data']['deformjax']


def test_dependencies_are_declared_once_and_the_core_needs_only_jax_flax_numpy():
  from packaging.requirements import Requirement

  project = PYPROJECT['project']
  core = [Requirement(r).name for r in project['dependencies']]
  assert len(core) == len(set(core)) and set(core) <= {'jax', 'flax', 'numpy', 'flatbuffers'}
  for extra, reqs in project['optional-dependencies'].items():
    names = [Requirement(r).name for r in reqs]
    assert len(names) == len(set(names)), f'[{extra}] lists a package twice'
    assert not set(names) & set(core), f'[{extra}] repeats a core dependency'


def test_no_project_address_is_declared():
  """The project has no verified public home yet: its metadata names none (.ci/build.sh checks the wheel too)."""
  assert 'urls' not in PYPROJECT['project']


# --- notebooks: the install cell takes its source from one variable -------------------------------------------

NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def _cells(path: pathlib.Path) -> list[str]:
  return [''.join(c['source']) for c in json.loads(path.read_text())['cells']]


def _install_cell(path: pathlib.Path) -> str:
  (cell,) = [c for c in _cells(path) if 'DEFORMJAX_SOURCE =' in c]
  return cell


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_installs_from_its_one_source_variable(path):
  """The first code cell sets DEFORMJAX_SOURCE once and installs `{DEFORMJAX_SOURCE}[extras]` from it, with extras
  that pyproject declares; nothing in the notebook names a remote address."""
  from packaging.requirements import Requirement

  code = [c['cell_type'] == 'code' for c in json.loads(path.read_text())['cells']]
  assert _cells(path)[code.index(True)] == _install_cell(path), 'the install cell is the first code cell'
  cell = _install_cell(path)
  assert cell.count('DEFORMJAX_SOURCE =') == 1
  (line,) = [ln.strip() for ln in cell.splitlines() if ln.strip().startswith('%pip install')]
  (target,) = [a for a in shlex.split(line)[2:] if not a.startswith('-')]
  source, extras = target.split('}', 1)
  assert source == '{DEFORMJAX_SOURCE'
  assert Requirement(f'deformjax{extras}').extras <= set(PYPROJECT['project']['optional-dependencies'])
  assert not re.search(r'https?://', path.read_text()), f'{path.name} names a remote address'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.parametrize('importable', [True, False], ids=['installed', 'fresh'])
def test_install_cell_runs(path, importable, monkeypatch, capsys):
  """The cell as IPython runs it: where deformjax imports nothing is installed; where it does not (Colab, a fresh
  environment) it installs from DEFORMJAX_SOURCE, then imports the installed package."""
  transform = pytest.importorskip('IPython.core.inputtransformer2').TransformerManager().transform_cell
  installed = sys.modules['deformjax']
  calls = []

  class Shell:  # what get_ipython() returns in a notebook, reduced to the line magic the cell uses
    def run_line_magic(self, magic, line):  # IPython expands {NAME} in a magic's line from the cell's namespace
      calls.append((magic, shlex.split(line.format(**namespace))))
      sys.modules['deformjax'] = installed  # the install succeeded: the next import finds the package

  if not importable:
    monkeypatch.setitem(sys.modules, 'deformjax', None)  # `import deformjax` raises ImportError, as on Colab
  namespace = {'get_ipython': Shell}
  exec(compile(transform(_install_cell(path)), path.name, 'exec'), namespace)
  if importable:
    assert calls == []
  else:
    ((magic, args),) = calls
    assert magic == 'pip' and args[0] == 'install' and args[-1].startswith(namespace['DEFORMJAX_SOURCE'] + '[')
  assert namespace['deformjax'] is installed
  assert f'deformjax {deformjax.__version__}' in capsys.readouterr().out


# --- the console script ---------------------------------------------------------------------------------------


def test_console_script_without_config_says_what_it_needs(monkeypatch, capsys):
  """From a wheel there is no experiments/ directory: `deformjax-train` alone ends in one line naming --config
  and the extras it needs."""
  target = PYPROJECT['project']['scripts']['deformjax-train']
  module_name, attr = target.split(':')
  module = _import(module_name)
  monkeypatch.setattr(sys, 'argv', ['deformjax-train'])
  with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
    warnings.simplefilter('ignore', DeprecationWarning)
    getattr(module, attr)()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith('error: --config') and 'deformjax[train,data]' in err, err

