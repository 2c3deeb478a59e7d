"""Test-wide JAX settings, what is collected, and the fast tier's per-test budget.

float64 is enabled so that the loop references in `reference.py` are exact
oracles; every float32/bf16 test names its dtype explicitly. Strict dtype
promotion and rank promotion raise (equinox does the same), so the library
never relies on an implicit upcast or broadcast.

The CPU backend exposes 8 devices, so that sharded training (8 devices against
`num_devices=1`), 2-device meshes and multi-device checkpoints are tested in
this process instead of in fresh interpreters. The setting only takes effect
before JAX starts its backends, which is why it lives here, ahead of every
test module. Unsharded computations still run on device 0 alone, as without it;
what changes is `jax.devices()` and the default training mesh (all devices).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_enable_x64', True)
jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')

# One compilation cache for the whole run. Tests build fresh jitted closures (every `train()` call, every module
# traced anew), so jit's in-memory cache misses where the program is the same; JAX's persistent cache is keyed by
# the program itself and serves an identical compile again, also to the other pytest-xdist workers, which inherit
# the directory through the environment (the first process to load this file makes it, and removes it at exit).
# DEFORMJAX_TEST_COMPILATION_CACHE=dir shares one across runs (`.ci/run` shares it between its test stages); a
# fresh clone starts empty, so no run depends on an earlier one's files.
_CACHE_ENV = 'DEFORMJAX_TEST_COMPILATION_CACHE'
if not os.environ.get(_CACHE_ENV):
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='deformjax-test-jit-')
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_ENV])
# Every compile, however short: most of the suite's programs are small, and their sum is what the cache saves.
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

# The shared helpers and the float64 references are imported by the tests, never collected as tests themselves
# (`--doctest-modules` would import each one). The PyTorch references, which need torch at import, live outside
# the testpaths in `references/`, where the benchmarks import them too.
collect_ignore = ['helpers.py', 'reference.py']

# The fast tier is a budget, not a wish: a test outside the slow tier whose setup and call take more CPU time than
# this fails by name, so that a new compile-heavy case cannot silently add a minute to every run. Make it cheaper,
# or mark it slow and give it a cheap fast sibling that proves the same property at a smaller shape. CPU time of
# this process (XLA's compile and run threads included), not wall time: other jobs on the machine do not make a
# test fail, a slower machine kind moves it by its clock ratio only. The figure is about three times the most
# expensive fast test on the 2-core machine the tier was sized on; DEFORMJAX_FAST_TEST_BUDGET_S overrides it
# (0 turns the guard off).
FAST_TEST_BUDGET_S = float(os.environ.get('DEFORMJAX_FAST_TEST_BUDGET_S', '30'))
_START = pytest.StashKey[float]()
# DEFORMJAX_TEST_COST_LOG=path appends one line per passed fast test: CPU seconds, wall seconds of the call, test id
# (how the tier's budget is kept: `sort -rn path | head`).
_COST_LOG = os.environ.get('DEFORMJAX_TEST_COST_LOG')


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
  item.stash[_START] = time.process_time()
  return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
  report = yield
  if call.when != 'call' or not report.passed or item.get_closest_marker('slow'):
    return report
  spent = time.process_time() - item.stash.get(_START, time.process_time())
  if _COST_LOG:
    with open(_COST_LOG, 'a') as log:
      log.write(f'{spent:.2f}\t{call.duration:.2f}\t{item.nodeid}\n')
  if 0 < FAST_TEST_BUDGET_S < spent:
    report.outcome = 'failed'
    report.longrepr = (f'{item.nodeid} took {spent:.1f} s of CPU time, over the fast tier\'s per-test budget of '
                       f'{FAST_TEST_BUDGET_S:g} s (tests/conftest.py): make it cheaper, or mark it slow and give it '
                       'a cheap fast sibling')
  return report


@pytest.fixture
def patch_traced(monkeypatch):
  """`patch_traced(obj, name, value)`: monkeypatch something an op reads while it is traced.

  The ops are jitted (`deformjax.ops._policy.compiled`), so a call at shapes traced before would reuse the program
  traced without the patch, and a program traced with it would serve later tests. JAX's caches are cleared when
  the patch is made and again when it is undone.
  """
  def patch(obj, name, value):
    monkeypatch.setattr(obj, name, value)
    jax.clear_caches()

  yield patch
  monkeypatch.undo()
  jax.clear_caches()
