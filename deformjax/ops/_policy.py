"""Execution policy of the sampling ops: how much sampled data one pass may hold, per backend.

The right loop structure depends on the hardware the function is *lowered* for,
not on the host that traced it. On CPU, cache-sized chunks walked by `lax.map`
are fastest (the columns stay in L2). On a GPU each loop iteration costs a
handful of kernel launches: 0.5 MiB chunks made `deform_conv2d` 30x slower than
one pass on an H100, and even 4 chunks of 256 MiB cost 1.6x over one pass
(measured on an H100 on 2026-11-27, at revision 50e8cd0). So accelerators run in
one pass while the sampled columns fit a memory budget and split only beyond it.

`by_platform` makes that choice with `lax.platform_dependent`, so a function
exported with `jax.export(..., platforms=['cuda'])` on a CPU host carries the
GPU structure, and a multi-platform export carries both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
from jax import lax

from deformjax.ops import _args

# Columns bytes per chunk on CPU: large enough that the per-iteration overhead is
# amortised, small enough to stay in L2. Swept 0.25-8 MiB on the CPU benchmark
# shapes: 0.5 MiB gave the best forward+backward (2.1-2.4x of lax.conv against
# 3.2-3.3x at 2 MiB) at the same forward time.
CPU_CHUNK_BYTES = 512 * 1024

# Columns bytes one pass may hold on GPU/TPU before the op splits the work into
# equal blocks. 1 GiB holds the largest DCNv4 operator shape (N=64, 56x56x128:
# 924 MB of float32 columns) in one pass; forward+backward then needs about twice
# that in temporaries, which fits a 16 GB Colab T4 as well as an H100. Override
# per call with `memory_budget=`, or for every op traced inside
# `with accelerator_memory_budget(nbytes):` (read at trace time).
DEFAULT_ACCELERATOR_MEMORY_BUDGET = 1024**3

# The scoped setting. A ContextVar (not a module global) so that a scope is seen
# only by the thread / asyncio task that opened it, and nested scopes unwind in order.
_accelerator_budget: contextvars.ContextVar[int] = contextvars.ContextVar(
    'deformjax_accelerator_memory_budget', default=DEFAULT_ACCELERATOR_MEMORY_BUDGET)


@contextlib.contextmanager
def accelerator_memory_budget(nbytes: int) -> Iterator[int]:
  """Within the block, ops traced for GPU/TPU hold at most `nbytes` of sampled columns per pass.

  Applies to functions traced (jitted, exported) inside the block, in this
  thread (or asyncio task) only; an explicit `memory_budget=` argument still
  wins. The value is read when a function is traced: a jitted function already
  compiled for these shapes keeps the plan it was traced with, so open the
  scope around the first call (or the `jax.export`). Scopes nest, and the
  previous value comes back when the block exits, also by an exception.
  `current_accelerator_memory_budget()` reads the value in effect.

  Args:
    nbytes: a positive int, bytes of sampled columns per pass.

  Yields:
    `nbytes`.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import accelerator_memory_budget, current_accelerator_memory_budget, deform_conv2d
    >>> with accelerator_memory_budget(256 * 2**20):
    ...   y = deform_conv2d(jnp.ones((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 18)), jnp.ones((3, 3, 4, 4)), padding=1)
    ...   current_accelerator_memory_budget() == 256 * 2**20
    True
    >>> current_accelerator_memory_budget() == 2**30
    True
  """
  nbytes = _args.positive_int(nbytes, 'nbytes', 'accelerator_memory_budget')
  token = _accelerator_budget.set(nbytes)
  try:
    yield nbytes
  finally:
    _accelerator_budget.reset(token)


def current_accelerator_memory_budget() -> int:
  """Bytes of sampled columns one pass may hold on GPU/TPU here and now.

  `DEFAULT_ACCELERATOR_MEMORY_BUDGET` (1 GiB) outside any
  `accelerator_memory_budget` scope, the innermost scope's value inside one.

  Example:
    >>> from deformjax.ops import current_accelerator_memory_budget
    >>> current_accelerator_memory_budget()
    1073741824
  """
  return _accelerator_budget.get()


# Bytes of corner samples (4 per sample point, C values each, in the coordinate
# dtype) that an eager `deform_roi_pool` / `roi_align` may ask for with
# torchvision's exact adaptive grid. Beyond it the grid is capped as under jit,
# so that no box, however large, asks for unbounded work (and the sample points,
# which are made at once). A bound on the total, not on one pass: passes follow
# `pixels_per_pass` as in every op.
ROI_EXACT_GRID_BYTES = 256 * 2**20


# True inside `single_pass()`. A context variable: scoped to the block and to the
# thread or task that entered it.
_SINGLE_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar('deformjax_single_pass', default=False)
# Output pixels per pass under `single_pass()` when no explicit cap is given: more
# than any input an export serves (deformjax.export bounds its symbolic batch so
# that `pixels <= SINGLE_PASS_PIXELS` is decidable at trace time).
SINGLE_PASS_PIXELS = 2**62


@contextlib.contextmanager
def single_pass() -> Iterator[None]:
  """Within the block, ops are traced as one pass with no per-platform switch.

  The plan of a graph that leaves XLA (ONNX: onnxruntime, TensorRT and OpenVINO
  schedule one graph themselves; chunks would be a sequential Loop node and a
  platform switch has no meaning there). `by_platform` takes the accelerator
  branch; `pixels_per_pass` is capped only by explicit `chunk_size` /
  `memory_budget` arguments. Read at trace time, like the memory budget.
  """
  token = _SINGLE_PASS.set(True)
  try:
    yield
  finally:
    _SINGLE_PASS.reset(token)


# Set inside `native_ops(...)`: op name -> the function an exporter traces instead
# of the op's sampled passes (deformjax.export: ONNX's own DeformConv).
_NATIVE_OPS: contextvars.ContextVar[tuple[tuple[str, Callable[..., Any]], ...]] = contextvars.ContextVar(
    'deformjax_native_ops', default=())


@contextlib.contextmanager
def native_ops(**ops: Callable[..., Any]) -> Iterator[None]:
  """Within the block, the named ops (e.g. `deform_conv2d=fn`) trace `fn` after validating their arguments.

  `fn` gets the op's validated arguments and returns the result, or None to
  decline (the op then runs as usual). For exporters whose target has its own
  operator for an op; read at trace time, scoped like `single_pass()`.
  """
  token = _NATIVE_OPS.set(tuple(ops.items()))
  try:
    yield
  finally:
    _NATIVE_OPS.reset(token)


def native_op(name: str) -> Callable[..., Any] | None:
  """The function `native_ops(...)` set for the op `name` in this context, or None."""
  return dict(_NATIVE_OPS.get()).get(name)


def pixels_per_pass(
    bytes_per_pixel: int,
    chunk_size: int | None,
    memory_budget: int | None,
    platform: str,
) -> int:
  """Most output pixels one pass (one chunk) may hold on `platform` ('cpu' or 'accelerator').

  CPU: `chunk_size` if given, else cache-sized chunks (`CPU_CHUNK_BYTES`);
  accelerators: what `current_accelerator_memory_budget()` allows (read at
  trace time), capped by `chunk_size`.
  An explicit `memory_budget` caps both. Under `single_pass()`, only the
  explicit arguments cap it.
  """
  if _SINGLE_PASS.get():  # one plan for every platform, capped only by the explicit arguments
    return min([SINGLE_PASS_PIXELS] + ([] if chunk_size is None else [int(chunk_size)])
               + ([] if memory_budget is None else [max(1, memory_budget // max(1, bytes_per_pixel))]))
  if platform == 'cpu' and chunk_size is not None:
    budget = memory_budget
  elif platform == 'cpu':
    budget = CPU_CHUNK_BYTES if memory_budget is None else min(memory_budget, CPU_CHUNK_BYTES)
  else:
    budget = current_accelerator_memory_budget() if memory_budget is None else memory_budget
  caps = [] if chunk_size is None else [int(chunk_size)]
  if budget is not None:
    caps.append(max(1, budget // max(1, bytes_per_pixel)))
  return min(caps)


def by_platform(cpu: Callable[..., Any], accelerator: Callable[..., Any], *args: Any) -> Any:
  """`cpu(*args)` when lowered for CPU, `accelerator(*args)` for GPU/TPU (both traced).

  Both callables must return the same structure of shapes and dtypes. Under
  `single_pass()`, only `accelerator(*args)` (the one-pass plan, alone).
  """
  if _SINGLE_PASS.get():  # the one-pass plan, alone
    return accelerator(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=accelerator)


_F = TypeVar('_F', bound=Callable[..., Any])


def jit_core(*static_argnames: str) -> Callable[[_F], _F]:
  """`jax.jit(core, static_argnames=...)` for an op's private core, the scoped settings it reads part of its key.

  An op's public function checks and normalises its arguments, then calls its core with arrays and hashable
  static arguments (the call's `_geometry.Geometry`, the settings): one compiled program per shapes and settings,
  as `jax.scipy.ndimage.map_coordinates` is (an unjitted op would compile each primitive for every new shape:
  about ten times one compile of the whole op).
  Inside `jit`, `vmap`, `grad` or `jax.export` the core is a nested call that XLA inlines. The accelerator memory
  budget the core reads when traced is passed as a static argument, so a `with accelerator_memory_budget(...)`
  scope compiles anew; inside `single_pass()` / `native_ops(...)` (an exporter tracing the graph it translates)
  the core is traced inline.
  """
  def decorate(core: _F) -> _F:
    def traced(*args: Any, budget: int, **kwargs: Any) -> Any:
      token = _accelerator_budget.set(budget)
      try:
        return core(*args, **kwargs)
      finally:
        _accelerator_budget.reset(token)

    traced.__name__ = traced.__qualname__ = core.__name__.lstrip('_')  # the op's name in jaxprs, HLO and profiles
    jitted = jax.jit(traced, static_argnames=(*static_argnames, 'budget'))

    @functools.wraps(core)
    def call(*args: Any, **kwargs: Any) -> Any:
      if _SINGLE_PASS.get() or _NATIVE_OPS.get():
        return core(*args, **kwargs)
      return jitted(*args, budget=_accelerator_budget.get(), **kwargs)

    return call  # type: ignore[return-value]

  return decorate


__all__ = ['CPU_CHUNK_BYTES', 'DEFAULT_ACCELERATOR_MEMORY_BUDGET', 'ROI_EXACT_GRID_BYTES', 'SINGLE_PASS_PIXELS',
           'accelerator_memory_budget', 'by_platform', 'current_accelerator_memory_budget', 'jit_core', 'native_op',
           'native_ops', 'pixels_per_pass', 'single_pass']
