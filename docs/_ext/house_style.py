"""Reads deformjax's docstring conventions the way a reader does.

A class whose metaclass defines ``__call__`` (every ``flax.nnx.Module``) would show that
generic ``(*args, **kwargs)`` as its signature; the hook shows its ``__init__``'s instead. A
dataclass (every ``flax.linen.Module``) shows its fields, defaults as written in the class
body, without Linen's own ``parent`` and ``name``.

It also reads a plural or possessive written straight after a quoted name, as in
"the four `nn.Linear`s", which reStructuredText would take for an unclosed quote: the
name stays code and the letters follow it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from typing import Any

from sphinx.util.inspect import stringify_signature

# `name` directly followed by a letter or digit (single backticks only, not ``literal``).
_GLUED = re.compile(r'(?<![`\\])`([^`\s][^`]*)`(?=[A-Za-z0-9])')


def unglue(line: str) -> str:
  r"""A quoted name glued to the letters after it gets an escaped space (rendered as nothing).

  Example:
    >>> print(unglue('the four `nn.Linear`s, `x` and ``y``s'))
    the four `nn.Linear`\ s, `x` and ``y``s
  """
  return _GLUED.sub(r'`\1`\\ ', line)


def _process(app, what, name, obj, options, lines: list[str]) -> None:
  lines[:] = [unglue(line) for line in lines]


class _Source:
  """A default value shown as the source text that wrote it (`default_kernel_init`, not `<function ...>`)."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


def source_defaults(fn) -> dict[str, str]:
  """Argument name -> the source text of its default, read from `fn`'s definition."""
  try:
    src = textwrap.dedent(inspect.getsource(fn))
    node = ast.parse(src).body[0]
  except (OSError, TypeError, SyntaxError, IndexError):
    return {}
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return {}
  args = node.args
  positional = args.posonlyargs + args.args
  pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
  pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
  return {a.arg: ast.get_source_segment(src, d) for a, d in pairs}


def init_signature(cls: type) -> str | None:
  """`cls.__init__`'s signature without `self`, defaults as written; None if it has none of its own."""
  init = next((c.__dict__['__init__'] for c in cls.__mro__ if '__init__' in c.__dict__), None)
  if init is None or init is object.__init__:
    return None
  sig = inspect.signature(init)
  written = source_defaults(init)
  params = [p.replace(default=_Source(written[p.name])) if p.name in written else p
            for p in list(sig.parameters.values())[1:]]
  return stringify_signature(sig.replace(parameters=params), show_return_annotation=False)


def field_defaults(cls: type) -> dict[str, str]:
  """Field name -> the source text of its default, for the annotated fields of a (dataclass) class body."""
  try:
    src = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(src).body[0]
  except (OSError, TypeError, SyntaxError, IndexError):
    return {}
  return {s.target.id: ast.get_source_segment(src, s.value) for s in getattr(node, 'body', ())
          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None}


# Fields every flax.linen.Module has, set by Linen itself rather than by the user.
LINEN_FIELDS = ('parent', 'name')


def _is_linen_module(cls: type) -> bool:
  try:
    from flax import linen
  except ImportError:
    return False
  return issubclass(cls, linen.Module)


def dataclass_signature(cls: type) -> str:
  """A dataclass's constructor, defaults as written in the class body; a Linen module's without Linen's fields."""
  sig = inspect.signature(cls)
  own = () if not _is_linen_module(cls) else LINEN_FIELDS
  written = {}
  for base in reversed(cls.__mro__):
    if base.__module__.split('.')[0] == cls.__module__.split('.')[0]:
      written.update(field_defaults(base))
  params = [p.replace(default=_Source(written[p.name])) if p.name in written else p
            for p in sig.parameters.values() if p.name not in own]
  return stringify_signature(sig.replace(parameters=params), show_return_annotation=False)


def _signature(app, what, name, obj, options, signature, return_annotation):
  if what == 'class' and isinstance(obj, type) and signature is not None:
    if dataclasses.is_dataclass(obj):
      return dataclass_signature(obj), return_annotation
    generic = signature.replace(' ', '') in ('(*args,**kwargs)', '(*args:Any,**kwargs:Any)')
    if generic and (better := init_signature(obj)) is not None:
      return better, return_annotation
  return None


def setup(app) -> dict[str, Any]:
  # Before napoleon (priority 500) turns the sections into fields.
  app.connect('autodoc-process-docstring', _process, priority=400)
  app.connect('autodoc-process-signature', _signature)
  return {'version': '1', 'parallel_read_safe': True, 'parallel_write_safe': True}
