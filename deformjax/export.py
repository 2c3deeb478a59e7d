"""ONNX export of deformjax ops, modules and models: standard operators only, a symbolic batch.

Deformable convolution here is gathers, multiplies and a matrix product, so the
exported graph uses only standard ONNX operators (`Gather`, `Mul`, `Gemm` /
`MatMul`, `Where`, ...) that onnxruntime, TensorRT and OpenVINO all implement;
no custom op or plugin is needed. Opt-in, `onnx_deform_conv=True` writes
`deform_conv2d` as ONNX's own `DeformConv` (opset 19), for runtimes that
implement it (onnxruntime does, with a native kernel).

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
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from deformjax.ops import _args, _policy

if TYPE_CHECKING:
  import onnx

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


def eval_for_inference(jaxpr: jex_core.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluates `jaxpr` like `jax.core.eval_jaxpr`, binding a converter-friendly inference program.

  Nested `jit` / `checkpoint` / custom-derivative calls are inlined (their
  bodies evaluated here, recursively), and integer `rem` becomes
  `x - div(x, y) * y`, equal for lax's truncating `div`. Everything else is
  bound unchanged. Called inside a trace (jax2onnx's), it re-emits the program.
  """
  env: dict[jex_core.Var, Any] = {}

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
    # jax types `Var.aval` as the base AbstractValue; rem's operands are ShapedArrays, which have a dtype.
    elif name == 'rem' and np.issubdtype(eqn.invars[0].aval.dtype, np.integer):  # type: ignore[attr-defined]
      x, y = invals
      outs = [lax.sub(x, lax.mul(lax.div(x, y), y))]
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _traceable(model_or_fn) -> tuple[Callable, list, list[str], str]:
  """`(fn, state, state_paths, label)`: `fn(state, *inputs)` returns `(outputs, state after the call)`.

  For an `nnx.Module` the state is its variables (the graph's constants); for a
  function it is empty. Returning the state lets the trace show whether the call
  changed it.
  """
  from flax import nnx

  if isinstance(model_or_fn, nnx.Module):
    graphdef, state = nnx.split(model_or_fn)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]

    def fn(leaves, *xs):
      module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      out = module(*xs)
      return out, jax.tree.leaves(nnx.state(module))

    return fn, [leaf for _, leaf in flat], paths, type(model_or_fn).__name__
  if not callable(model_or_fn):
    raise TypeError(f'to_onnx: model_or_fn must be a callable or an nnx.Module, got {type(model_or_fn).__name__}')
  return (lambda leaves, *xs: (model_or_fn(*xs), [])), [], [], getattr(model_or_fn, '__name__', 'function')


def op_types(model: onnx.ModelProto) -> dict[tuple[str, str], int]:
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


# ONNX's DeformConv (opset 19) for deform_conv2d, opt-in (`onnx_deform_conv=True`).
DEFORM_CONV_OPSET = 19


@functools.cache
def _deform_conv_primitive() -> jex_core.Primitive:
  """A JAX primitive standing for ONNX DeformConv on NCHW / OIHW operands, with its jax2onnx lowering.

  Operands: X `[N, C, H, W]`, W `[C_out, C // group, kh, kw]`, offset
  `[N, offset_group*kh*kw*2, Ho, Wo]` ((dy, dx) pairs, torchvision's order, as
  ONNX's), B `[C_out]`, mask `[N, offset_group*kh*kw, Ho, Wo]`; result
  `[N, C_out, Ho, Wo]`. It is only ever converted, never executed.
  """
  # jax2onnx's public plugin API only (`PrimitiveLeafPlugin`, `register_primitive`, and the lowering context's
  # `get_value_for_var` / `fresh_name` / `builder` / `bind_value_for_var`); the result's type and shape are set
  # with onnx_ir's own classes.
  import onnx_ir as ir
  from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

  prim = jex_core.Primitive('deformjax_onnx_deform_conv')

  def abstract_eval(x, w, off, b, m, **params):
    return jax.core.ShapedArray((x.shape[0], w.shape[0]) + tuple(off.shape[2:]), x.dtype)

  def impl(*args, **params):
    raise NotImplementedError('ONNX DeformConv is a conversion target only; call deform_conv2d in JAX')

  prim.def_abstract_eval(abstract_eval)
  prim.def_impl(impl)

  @register_primitive(jaxpr_primitive=prim.name, context='primitives.deformjax', component='deform_conv',
                      since='deformjax', onnx=[{'component': 'DeformConv'}], testcases=[])
  class _DeformConvPlugin(PrimitiveLeafPlugin):
    def lower(self, ctx, eqn):
      operands = [ctx.get_value_for_var(v, name_hint=ctx.fresh_name('deform_conv_in')) for v in eqn.invars]
      (out_var,) = eqn.outvars
      out_spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name('deform_conv_out'))
      name = getattr(out_spec, 'name', None) or ctx.fresh_name('DeformConv')
      p = eqn.params
      result = ctx.builder.DeformConv(*operands, _outputs=[name], kernel_shape=list(p['kernel_shape']),
                                      strides=list(p['strides']), pads=list(p['pads']),
                                      dilations=list(p['dilations']), group=p['group'],
                                      offset_group=p['offset_group'])
      result.type = ir.TensorType(ir.DataType.FLOAT)
      # A symbolic batch keeps its name ('N'), so the graph output's shape reads like the input's.
      result.shape = ir.Shape([int(d) if isinstance(d, (int, np.integer)) else ir.SymbolicDim(str(d))
                               for d in out_var.aval.shape])
      ctx.bind_value_for_var(out_var, result)

  return prim


def _onnx_deform_conv(inputs, offsets, kernel, mask, bias, *, strides, padding, dilation, groups, offset_groups):
  """deform_conv2d as one ONNX DeformConv node (float32 only; None, i.e. the gather graph, otherwise)."""
  from jax import numpy as jnp

  from deformjax.ops import output_size
  from deformjax.ops._args import pair

  if any(a is not None and a.dtype != np.float32 for a in (inputs, offsets, kernel, mask, bias)):
    return None
  n, h, w, _ = inputs.shape
  kh, kw, _, cout = kernel.shape
  (ho, wo), ((pt, pb), (pl, pr)) = output_size((h, w), (kh, kw), strides, padding, dilation)
  if mask is None:
    mask = jnp.ones((n, ho, wo, offset_groups * kh * kw), np.float32)
  bias = jnp.zeros((cout,), np.float32) if bias is None else bias
  y = _deform_conv_primitive().bind(
      inputs.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1), offsets.transpose(0, 3, 1, 2), bias,
      mask.transpose(0, 3, 1, 2), kernel_shape=(kh, kw), strides=pair(strides, 'strides', 'deform_conv2d'),
      pads=(pt, pl, pb, pr), dilations=pair(dilation, 'dilation', 'deform_conv2d'), group=groups,
      offset_group=offset_groups)
  return y.transpose(0, 2, 3, 1)


# The only private jax2onnx names deformjax reads (`jax2onnx.plugins.plugin_system`'s), for the lean plugin
# registry below: jax2onnx has no public way to register part of its plugin tree. The `[onnx]` extra pins
# jax2onnx to the release series they were checked on, and tests/test_onnx.py fails by name if one goes.
_JAX2ONNX_PRIVATE_NAMES = ('_already_imported_plugins', '_import_tree')


@contextlib.contextmanager
def _lean_plugin_registry() -> Iterator[None]:
  """jax2onnx with only its `jax` and `flax` plugin trees registered, for the block.

  On first use jax2onnx imports its whole plugin tree, example models and the
  equinox plugins included, whose import compiles programs: 20 s on a 2-core
  CPU against 1.5 s for the trees a lax-level program needs. Outside the block
  jax2onnx's own state is as before, so a later direct jax2onnx call still
  imports everything it wants. Where jax2onnx lacks the private names
  (`_JAX2ONNX_PRIVATE_NAMES`), the block changes nothing: jax2onnx imports its
  whole tree, slower, with the same result.
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
def _quiet(logger_name: str) -> Iterator[None]:
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
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    onnx_deform_conv: bool = False,
) -> onnx.ModelProto:
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
    opset: ONNX opset of the standard domain (default 17, or 19 with
      `onnx_deform_conv`).
    input_names, output_names: graph input / output names (default `in_0`... /
      jax2onnx's).
    onnx_deform_conv: emit ONNX's own `DeformConv` (opset 19) for every float32
      `deform_conv2d` (and so `DeformConv` layer) instead of its gather graph:
      the same values (torchvision's semantics, which ONNX's operator follows),
      run by onnxruntime's native kernel (several times faster on CPU), but
      only runtimes that implement that operator can load the model.

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
  _args.check_bool(onnx_deform_conv, 'onnx_deform_conv', 'to_onnx')
  least = DEFORM_CONV_OPSET if onnx_deform_conv else 13
  if opset is None:
    opset = DEFORM_CONV_OPSET if onnx_deform_conv else DEFAULT_OPSET
  if not _args.is_int(opset) or opset < least:
    raise ValueError(f'to_onnx: opset must be an int >= {least}'
                     f'{" (DeformConv is opset 19)" if onnx_deform_conv else ""}, got {opset!r}')
  opset = int(opset)  # a NumPy int passes the check; the ONNX model gets a Python int
  specs = _specs(list(example_inputs), dynamic_batch)
  fn, state, paths, label = _traceable(model_or_fn)
  native = {'deform_conv2d': _onnx_deform_conv} if onnx_deform_conv else {}
  with _policy.single_pass(), _policy.native_ops(**native), _lean_plugin_registry():
    if onnx_deform_conv:
      _deform_conv_primitive()  # registers its jax2onnx lowering
    try:
      closed = jax.make_jaxpr(fn)(state, *specs)
    except jax.errors.ConcretizationTypeError as e:
      raise ExportError(f'to_onnx: {label} needs a concrete value where the export has a symbolic shape or a traced '
                        f'input: {str(e).splitlines()[0]}') from None
  _check_inference(closed.jaxpr, label)
  jaxpr, n_state = closed.jaxpr, len(state)
  state_out = jaxpr.outvars[len(jaxpr.outvars) - n_state:]
  changed = [p for p, v_in, v_out in zip(paths, jaxpr.invars[:n_state], state_out) if v_in is not v_out]
  if changed:
    raise ExportError(
        f'to_onnx: calling {label} updates its state ({", ".join(changed[:3])}{", ..." if len(changed) > 3 else ""}), '
        'e.g. BatchNorm in training mode; an ONNX graph is inference only: export model.eval() or the inference call')

  def program(*xs):
    outs = eval_for_inference(jaxpr, closed.consts, *state, *xs)[:len(jaxpr.outvars) - n_state]
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


__all__ = ['DEFAULT_OPSET', 'DEFORM_CONV_OPSET', 'MAX_BATCH', 'STANDARD_DOMAINS', 'ExportError', 'eval_for_inference', 'op_types',
           'to_onnx']
