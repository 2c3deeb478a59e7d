"""ONNX export of deformjax ops, modules and models: standard operators only, a symbolic batch.

Deformable convolution here is gathers, multiplies and a matrix product, so the
exported graph uses only standard ONNX operators (`Gather`, `Mul`, `Gemm` /
`MatMul`, `Where`, ...) that onnxruntime, TensorRT and OpenVINO all implement;
no custom op or plugin is needed.

`to_onnx` works in three steps:

1. The function (or `nnx.Module`) is traced by JAX itself (`jax.make_jaxpr`)
   with a `jax.export` symbolic batch, inside `deformjax.ops._policy.single_pass()`:
   every op runs as one pass (no `lax.map` chunks, no `lax.platform_dependent`
   switch), which is the plan an external runtime wants.
2. The resulting program is re-evaluated primitive by primitive for inference:
   nested `jit`, `checkpoint` and custom-derivative calls are inlined (an
   inference graph has no use for them), and integer `rem` is spelled as
   `x - (x // y) * y` (exact for lax's truncating division), since jax2onnx
   0.17 mislowers integer `rem` over a symbolic composite shape such as `64*N`.
3. jax2onnx converts that program (of lax primitives only, so its own
   `jax.numpy` substitutions never reach deformjax's argument checks).

Only inference graphs convert: a module whose call updates its state (BatchNorm
in training mode) or draws random numbers (dropout) is refused with one line
saying so. `jax2onnx`, `onnx` (and `onnxruntime` to run the result) are the
`[onnx]` extra; they are imported only when this module's functions run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from deformjax.ops import _policy

# ONNX domains of the standard operators ('' and its alias 'ai.onnx').
STANDARD_DOMAINS = ('', 'ai.onnx')
# The opset `to_onnx` writes by default: ONNX 1.13+ (2022), implemented by
# onnxruntime >= 1.14, TensorRT 8.6+ and OpenVINO 2023+.
DEFAULT_OPSET = 17
# Upper bound given to a symbolic batch: the ops index with int32 under a
# symbolic shape, so an export serves fewer than 2**31 elements anyway, and a
# bound lets the one-pass plan be decided at trace time.
MAX_BATCH = 2**31 - 1

# Primitives whose body is inlined for inference (their jaxpr parameter holds it).
_INLINED = {'pjit': 'jaxpr', 'jit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
            'remat': 'jaxpr', 'checkpoint': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
            'custom_vjp_call': 'call_jaxpr', 'custom_vjp_call_jaxpr': 'fun_jaxpr'}
# Primitives that only a training graph (or a random one) contains.
_RANDOM = {'random_bits', 'random_seed', 'random_wrap', 'random_unwrap', 'random_fold_in', 'random_split',
           'threefry2x32', 'rng_bit_generator', 'rng_uniform'}


class ExportError(ValueError):
  """A function or module that cannot become an ONNX inference graph (the message says why)."""


def _require(module: str):
  try:
    return __import__(module)
  except ImportError:
    raise ImportError(f'deformjax.export needs {module}: pip install "deformjax[onnx]" '
                      '(jax2onnx, onnx, onnxruntime)') from None


def _specs(example_inputs, dynamic_batch) -> list[jax.ShapeDtypeStruct]:
  """Example arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs whose axis 0 is symbolic where asked."""
  shapes = [tuple(np.shape(x)) for x in example_inputs]
  dtypes = [np.dtype(getattr(x, 'dtype', None) or np.asarray(x).dtype) for x in example_inputs]
  if dynamic_batch is True:
    names = ['N' if s else None for s in shapes]
  elif dynamic_batch is False or dynamic_batch is None:
    names = [None] * len(shapes)
  elif isinstance(dynamic_batch, Sequence) and not isinstance(dynamic_batch, str) and len(dynamic_batch) == len(
      shapes) and all(n is None or (isinstance(n, str) and n.isidentifier()) for n in dynamic_batch):
    names = list(dynamic_batch)
  else:
    raise ValueError('to_onnx: dynamic_batch must be True, False or one name (an identifier) or None per input, '
                     f'{len(shapes)} in all, got {dynamic_batch!r}')
  for name, shape, i in zip(names, shapes, range(len(shapes))):
    if name is not None and not shape:
      raise ValueError(f'to_onnx: example input {i} is a scalar; it has no batch axis to make dynamic')
  symbols = sorted({n for n in names if n is not None})
  dims = {}
  if symbols:
    scope = jax.export.SymbolicScope([f'{s} <= {MAX_BATCH}' for s in symbols])
    dims = dict(zip(symbols, jax.export.symbolic_shape(','.join(symbols), scope=scope)))
  return [jax.ShapeDtypeStruct(((dims[n],) + s[1:]) if n is not None else s, d)
          for n, s, d in zip(names, shapes, dtypes)]


def _check_inference(jaxpr, where: str) -> None:
  """Refuses random-number primitives anywhere in `jaxpr` (dropout, noise): not an inference graph."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _RANDOM:
      raise ExportError(f'to_onnx: {where} draws random numbers ({eqn.primitive.name}), e.g. dropout in training '
                        'mode; export the inference call (train=False / deterministic=True / model.eval())')
    for sub in _subjaxprs(eqn):
      _check_inference(sub, where)


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def eval_for_inference(jaxpr, consts, *args) -> list:
  """Evaluates `jaxpr` like `jax.core.eval_jaxpr`, binding a converter-friendly inference program.

  Nested `jit` / `checkpoint` / custom-derivative calls are inlined (their
  bodies evaluated here, recursively), and integer `rem` becomes
  `x - div(x, y) * y`, equal for lax's truncating `div`. Everything else is
  bound unchanged. Called inside a trace (jax2onnx's), it re-emits the program.
  """
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    body = eqn.params.get(_INLINED[name]) if name in _INLINED else None
    if body is not None:
      if isinstance(body, jex_core.ClosedJaxpr):
        outs = eval_for_inference(body.jaxpr, body.consts, *invals)
      else:
        outs = eval_for_inference(body, (), *invals)
    elif name == 'rem' and np.issubdtype(eqn.invars[0].aval.dtype, np.integer):
      x, y = invals
      outs = [lax.sub(x, lax.mul(lax.div(x, y), y))]
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _as_function(model_or_fn) -> tuple[Callable, str]:
  """A pure function of the inputs (module state captured as constants), and what to call it in errors."""
  from flax import nnx

  if isinstance(model_or_fn, nnx.Module):
    graphdef, state = nnx.split(model_or_fn)
    leaves = jax.tree.leaves(state)

    def call(*xs):
      module = nnx.merge(graphdef, state)
      out = module(*xs)
      after = jax.tree.leaves(nnx.state(module))
      changed = [i for i, (a, b) in enumerate(zip(leaves, after)) if a is not b]
      if changed:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        raise ExportError(
            f'to_onnx: calling {type(model_or_fn).__name__} updates its state ({", ".join(paths[i] for i in changed[:3])}'
            f'{", ..." if len(changed) > 3 else ""}), e.g. BatchNorm in training mode; an ONNX graph is inference '
            'only: export model.eval() (or call it with use_running_average=True)')
      return out

    return call, type(model_or_fn).__name__
  if not callable(model_or_fn):
    raise TypeError(f'to_onnx: model_or_fn must be a callable or an nnx.Module, got {type(model_or_fn).__name__}')
  return model_or_fn, getattr(model_or_fn, '__name__', type(model_or_fn).__name__)


def op_types(model) -> dict[tuple[str, str], int]:
  """Counts of `(domain, op_type)` over every node of `model`, nested graphs (If/Loop bodies) included.

  Standard operators have domain '' (or 'ai.onnx'); anything else is a custom op.
  """
  counts: dict[tuple[str, str], int] = {}

  def walk(graph):
    for node in graph.node:
      key = (node.domain, node.op_type)
      counts[key] = counts.get(key, 0) + 1
      for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField('g') else []):
          walk(g)

  walk(model.graph)
  for function in model.functions:
    for node in function.node:
      key = (node.domain, node.op_type)
      counts[key] = counts.get(key, 0) + 1
  return counts


@contextlib.contextmanager
def _lean_plugin_registry():
  """jax2onnx with only its `jax` and `flax` plugin trees registered, for the block.

  On first use jax2onnx imports its whole plugin tree, example models and the
  equinox plugins included, whose import compiles programs: 20 s on a 2-core
  CPU against 1.5 s for the trees a lax-level program needs. Outside the block
  jax2onnx's own state is as before, so a later direct jax2onnx call still
  imports everything it wants.
  """
  try:
    import pathlib

    from jax2onnx.plugins import plugin_system
    previous = plugin_system._already_imported_plugins
    root = pathlib.Path(plugin_system.__file__).parent
    if not previous:
      for tree in ('jax', 'flax'):
        plugin_system._import_tree(root / tree, f'jax2onnx.plugins.{tree}')
    plugin_system._already_imported_plugins = True
  except (ImportError, AttributeError):  # another jax2onnx layout: let it import what it wants
    yield
    return
  try:
    yield
  finally:
    plugin_system._already_imported_plugins = previous


@contextlib.contextmanager
def _quiet(logger_name: str):
  """onnx_ir logs a warning per untyped shape helper value; they carry no information for users."""
  logger = logging.getLogger(logger_name)
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def to_onnx(
    model_or_fn: Callable[..., Any],
    example_inputs: Sequence[Any] | Any,
    *,
    dynamic_batch: bool | Sequence[str | None] = True,
    path: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
):
  """Exports a deformjax op, module or model to an ONNX model of standard operators.

  Args:
    model_or_fn: an `nnx.Module` (called as `model(*inputs)`, its parameters
      stored in the graph as initializers) or a function of arrays (close over
      keyword arguments and weights with `functools.partial` or a lambda; for a
      Linen module pass `functools.partial(module.apply, variables)`).
    example_inputs: the positional inputs (arrays or `jax.ShapeDtypeStruct`s;
      one array alone is one input). Their shapes and dtypes are those of the
      graph inputs, except the batch axes made dynamic.
    dynamic_batch: True makes axis 0 of every input the one symbolic batch `N`;
      False keeps every shape fixed; a sequence gives, per input, the name of
      its symbolic axis 0 or None (e.g. `('N', 'R')` for features and RoIs).
    path: if given, the model is also written there (`onnx.save`).
    opset: ONNX opset of the standard domain (default 17).
    input_names, output_names: graph input / output names (default `in_0`... /
      jax2onnx's).

  Returns:
    The `onnx.ModelProto`, checked with `onnx.checker`. Every node is a standard
    ONNX operator (`ExportError` otherwise).

  Raises:
    ExportError: the call is not an inference graph (it draws random numbers or
      updates module state) or the conversion produced a non-standard operator.
    ImportError: jax2onnx or onnx is not installed (the `[onnx]` extra).

  Example:
    >>> import numpy as np, onnxruntime as ort
    >>> from flax import nnx
    >>> from deformjax.export import to_onnx
    >>> from deformjax.nn import DeformConv
    >>> layer = DeformConv(4, 8, 3, padding=1, rngs=nnx.Rngs(0))
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    >>> model = to_onnx(layer, [x])
    >>> [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    ['N', 8, 8, 4]
    >>> session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    >>> y = session.run(None, {'in_0': x[:1]})[0]
    >>> y.shape, bool(np.abs(y - np.asarray(layer(x[:1]))).max() < 1e-5)
    ((1, 8, 8, 8), True)
  """
  jax2onnx = _require('jax2onnx')
  onnx = _require('onnx')
  if isinstance(example_inputs, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or not isinstance(
      example_inputs, Sequence):
    example_inputs = [example_inputs]
  if not isinstance(opset, int) or isinstance(opset, bool) or opset < 13:
    raise ValueError(f'to_onnx: opset must be an int >= 13, got {opset!r}')
  specs = _specs(list(example_inputs), dynamic_batch)
  fn, label = _as_function(model_or_fn)
  with _policy.single_pass():
    try:
      closed = jax.make_jaxpr(fn)(*specs)
    except jax.errors.ConcretizationTypeError as e:
      raise ExportError(f'to_onnx: {label} needs a concrete value where the export has a symbolic shape or a traced '
                        f'input: {str(e).splitlines()[0]}') from None
  _check_inference(closed.jaxpr, label)

  def program(*xs):
    outs = eval_for_inference(closed.jaxpr, closed.consts, *xs)
    return outs[0] if len(outs) == 1 else tuple(outs)

  double = any(np.dtype(s.dtype) == np.float64 for s in specs)
  names = list(input_names) if input_names is not None else [f'in_{i}' for i in range(len(specs))]
  with _lean_plugin_registry(), _quiet('onnx_ir.serde'), _quiet('jax2onnx'):
    model = jax2onnx.to_onnx(program, specs, model_name=label, opset=opset, enable_double_precision=double,
                             input_names=names, output_names=output_names)
  custom = sorted({f'{d}::{t}' for d, t in op_types(model) if d not in STANDARD_DOMAINS})
  if custom:
    raise ExportError(f'to_onnx: the graph of {label} has non-standard operators {custom}; it would not run on '
                      'every runtime')
  onnx.checker.check_model(model)
  if path is not None:
    onnx.save(model, os.fspath(path))
  return model


__all__ = ['DEFAULT_OPSET', 'MAX_BATCH', 'STANDARD_DOMAINS', 'ExportError', 'eval_for_inference', 'op_types',
           'to_onnx']
