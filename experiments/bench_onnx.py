"""Benchmark the ONNX export in onnxruntime (CPU) beside JAX's jitted CPU time, side by side in one process.

Cases: the deformable classifiers of the studies (ConvClassifier with its last
two convs deformable and modulated on 28x28x1 digits; CifarNet with both convs
deformable on 32x32x3) and, for reference, the same networks with regular convs,
at batch 64 and batch 1, and `deform_conv2d` (3x3, pad
1, with mask) at the CPU benchmark shapes of `experiments/bench_ops.py`. Each
model is exported once with `deformjax.export.to_onnx` (symbolic batch) and run
by an onnxruntime CPU session; the JAX side is the same function under
`jax.jit`. Median of many interleaved runs after warm-up (see
`experiments.common.interleaved_ms`). Writes bench_onnx_cpu.json / .md under
`--out` (runs/; `--out experiments/results` refreshes the committed ones). The
config (experiments/configs/bench_onnx.py) holds every setting:

  python -m experiments.bench_onnx --out experiments/results
  python -m experiments.bench_onnx --config.repeats=10 --config.ops=False   # classifiers only
  python -m experiments.bench_onnx --config.profile=True                    # + onnxruntime's per-op-type time
  python -m experiments.bench_onnx --config=experiments/configs/bench_onnx.py:runlocal   # a smoke test

Deformable models are also exported with `onnx_deform_conv=True` (ONNX's own
DeformConv, opset 19, onnxruntime's native kernel) and timed beside the rest.
With `profile=True` each classifier also runs once more under onnxruntime's
profiler and the result lists the operator types that take the most time.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.export import op_types, to_onnx
from deformjax.models import CifarNet, ConvClassifier
from deformjax.ops import deform_conv2d
from experiments.common import bench_main, benchmark_header, benchmark_metadata, config_names, interleaved_ms, jax_call

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'bench_onnx.py'

CLASSIFIERS = {
    # name: (builder, input shape without the batch)
    'conv5-deformable2-modulated': (
        lambda: ConvClassifier(1, 10, deformable=2, modulated=True, rngs=nnx.Rngs(0)), (28, 28, 1)),
    'cifarnet-deformable-all': (lambda: CifarNet(3, 10, deformable='all', rngs=nnx.Rngs(0)), (32, 32, 3)),
    # The same networks with regular convs: how far onnxruntime is from XLA before any deformable layer.
    'conv5-regular': (lambda: ConvClassifier(1, 10, deformable='none', rngs=nnx.Rngs(0)), (28, 28, 1)),
    'cifarnet-regular': (lambda: CifarNet(3, 10, deformable='none', rngs=nnx.Rngs(0)), (32, 32, 3)),
}
def randomised(module, seed=0, scale=0.1):
  """Every parameter random: fresh offset predictors are zero, so the offsets would all be 0."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rng = np.random.default_rng(seed)  # numpy: one eager jax.random call per shape would compile each
  params = jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params)
  return nnx.merge(graphdef, params, rest)


def ort_session(model, profile_dir: str | None = None, spinning: bool = True):
  """An onnxruntime CPU session; `spinning=False` stops idle intra-op threads from busy-waiting (which, on a
  machine shared with other work, costs more than it saves)."""
  import onnxruntime as ort

  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  if not spinning:
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
  if profile_dir is not None:
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(profile_dir, 'ort')
  return ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])


def ort_call(sess, inputs):
  names = [i.name for i in sess.get_inputs()]
  feed = dict(zip(names, inputs))
  return lambda: sess.run(None, feed)


def profile_by_op_type(model, inputs, runs: int = 5) -> list[dict]:
  """onnxruntime's profiler over `runs` runs: total time per operator type, largest first."""
  with tempfile.TemporaryDirectory() as tmp:
    sess = ort_session(model, tmp, spinning=False)
    call = ort_call(sess, inputs)
    for _ in range(runs):
      call()
    trace = json.loads(pathlib.Path(sess.end_profiling()).read_text())
  per_type = collections.Counter()
  for event in trace:
    if event.get('cat') == 'Node' and event.get('name', '').endswith('_kernel_time'):
      per_type[event['args']['op_name']] += event['dur']
  total = sum(per_type.values()) or 1
  return [{'op_type': t, 'ms_per_run': us / runs / 1e3, 'share': us / total} for t, us in per_type.most_common(8)]


def bench_classifiers(names, batches, repeats: int, rounds: int, profile: bool) -> list[dict]:
  rows = []
  rng = np.random.default_rng(0)
  for name in names:
    build, shape = CLASSIFIERS[name]
    net = randomised(build())
    model = to_onnx(net, np.zeros((2,) + shape, np.float32))
    native = to_onnx(net, np.zeros((2,) + shape, np.float32), onnx_deform_conv=True) if 'deformable' in name else None
    jitted = jax.jit(lambda x, net=net: net(x))
    sess, calm = ort_session(model), ort_session(model, spinning=False)
    native_sessions = None if native is None else (ort_session(native), ort_session(native, spinning=False))
    for batch in batches:
      x = rng.uniform(size=(batch,) + shape).astype(np.float32)
      xj = jnp.asarray(x)
      got = ort_call(sess, [x])()[0]
      err = float(np.abs(got - np.asarray(jitted(xj))).max())
      per_round = max(1, -(-repeats // rounds))
      cases = {'jax': jax_call(jitted, xj), 'onnx': ort_call(sess, [x]), 'onnx_no_spin': ort_call(calm, [x])}
      if native_sessions is not None:
        cases['native'] = ort_call(native_sessions[0], [x])
        cases['native_no_spin'] = ort_call(native_sessions[1], [x])
        err = max(err, float(np.abs(cases['native']()[0] - np.asarray(jitted(xj))).max()))
      times = interleaved_ms(cases, rounds, per_round, warmup=3)
      row = {'case': name, 'batch': batch, 'input': list(shape), 'jax_ms': times['jax'], 'onnx_ms': times['onnx'],
             'onnx_no_spin_ms': times['onnx_no_spin'], 'onnx_over_jax': times['onnx'] / times['jax'],
             'onnx_no_spin_over_jax': times['onnx_no_spin'] / times['jax'], 'max_abs_diff': err,
             'nodes': sum(op_types(model).values())}
      if native_sessions is not None:
        row.update(native_ms=times['native'], native_no_spin_ms=times['native_no_spin'],
                   native_over_jax=times['native'] / times['jax'],
                   native_no_spin_over_jax=times['native_no_spin'] / times['jax'])
      if profile:
        row['onnx_profile'] = profile_by_op_type(model, [x])
      rows.append(row)
      print(f"{name} batch {batch}: jax {row['jax_ms']:.3f} ms, onnxruntime {row['onnx_ms']:.3f} ms "
            f"({row['onnx_over_jax']:.2f}x; without spinning {row['onnx_no_spin_over_jax']:.2f}x)"
            + (f"; with ONNX DeformConv {row['native_over_jax']:.2f}x / {row['native_no_spin_over_jax']:.2f}x"
               if 'native_ms' in row else '') + f", max |diff| {err:.1e}", flush=True)
  return rows


def bench_ops(shapes, repeats: int, rounds: int) -> list[dict]:
  rows = []
  for n, hw, c in shapes:
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (n, hw, hw, c), jnp.float32)
    off = jax.random.uniform(k[1], (n, hw, hw, 18), jnp.float32, -2.0, 2.0)
    mask = jax.random.uniform(k[2], (n, hw, hw, 9), jnp.float32)
    w = np.asarray(jax.random.normal(k[3], (3, 3, c, c), jnp.float32) / np.sqrt(9 * c))
    fn = lambda x, off, mask, w=w: deform_conv2d(x, off, w, mask, padding=1)
    model = to_onnx(fn, (x[:2], off[:2], mask[:2]))
    native = to_onnx(fn, (x[:2], off[:2], mask[:2]), onnx_deform_conv=True)
    jitted = jax.jit(fn)
    sess, calm, nat = ort_session(model), ort_session(model, spinning=False), ort_session(native)
    host = [np.asarray(a) for a in (x, off, mask)]
    want = np.asarray(jitted(x, off, mask))
    err = max(float(np.abs(ort_call(s, host)()[0] - want).max()) for s in (sess, nat))
    per_round = max(1, -(-repeats // rounds))
    times = interleaved_ms({'jax': jax_call(jitted, x, off, mask), 'onnx': ort_call(sess, host),
                            'onnx_no_spin': ort_call(calm, host), 'native': ort_call(nat, host)}, rounds, per_round)
    row = {'case': 'deform_conv2d 3x3 pad 1 mask', 'N': n, 'H': hw, 'W': hw, 'C_in': c, 'C_out': c,
           'jax_ms': times['jax'], 'onnx_ms': times['onnx'], 'onnx_no_spin_ms': times['onnx_no_spin'],
           'onnx_over_jax': times['onnx'] / times['jax'],
           'onnx_no_spin_over_jax': times['onnx_no_spin'] / times['jax'], 'native_ms': times['native'],
           'native_over_jax': times['native'] / times['jax'], 'max_abs_diff': err}
    rows.append(row)
    print(f"deform_conv2d N={n} {hw}x{hw} {c}->{c}: jax {row['jax_ms']:.2f} ms, onnxruntime {row['onnx_ms']:.2f} ms "
          f"({row['onnx_over_jax']:.2f}x), ONNX DeformConv {row['native_ms']:.2f} ms ({row['native_over_jax']:.2f}x), "
          f"max |diff| {err:.1e}", flush=True)
  return rows


def _dist_version(name: str, module) -> str:
  try:
    from importlib.metadata import version
    return version(name)
  except Exception:  # not installed as a distribution
    return getattr(module, '__version__', 'unknown')


def versions() -> dict:
  """The exporter's and the runtime's versions (benchmark_metadata adds python, jax, flax, deformjax)."""
  import jax2onnx
  import onnx
  import onnxruntime

  return {'jax2onnx': _dist_version('jax2onnx', jax2onnx), 'onnx': onnx.__version__,
          'onnxruntime': onnxruntime.__version__}


def to_markdown(result: dict) -> str:
  lines = [f"# {result['benchmark']}", '',
           benchmark_header(result), '',
           '## Classifiers', '',
           'onnxruntime runs the default export (standard operators: the gather graph) and, where a layer is '
           'deformable, the opt-in export with ONNX DeformConv (`onnx_deform_conv=True`).', '',
           '| model | input | batch | JAX jit (ms) | onnxruntime (ms) | onnxruntime / JAX | no spinning (ms) '
           '| no spinning / JAX | DeformConv (ms) | DeformConv / JAX | DeformConv, no spinning / JAX '
           '| max abs diff | nodes |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in result['classifiers']:
    lines.append(f"| {r['case']} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['jax_ms']:.3f} | "
                 f"{r['onnx_ms']:.3f} | {r['onnx_over_jax']:.2f}x | {r['onnx_no_spin_ms']:.3f} | "
                 f"{r['onnx_no_spin_over_jax']:.2f}x | "
                 + (f"{r['native_ms']:.3f} | {r['native_over_jax']:.2f}x | {r['native_no_spin_over_jax']:.2f}x"
                    if 'native_ms' in r else '- | - | -')
                 + f" | {r['max_abs_diff']:.1e} | {r['nodes']} |")
  profiled = [r for r in result['classifiers'] if 'onnx_profile' in r]
  if profiled:
    lines += ['', '### Where onnxruntime spends its time (profiler, per operator type)', '']
    for r in profiled:
      top = ', '.join(f"{p['op_type']} {100 * p['share']:.0f}%" for p in r['onnx_profile'])
      lines.append(f"- {r['case']}, batch {r['batch']}: {top}")
  if result['ops']:
    lines += ['', '## deform_conv2d (3x3, pad 1, mask)', '',
              '| N | H x W | C_in -> C_out | JAX jit (ms) | onnxruntime (ms) | onnxruntime / JAX | no spinning (ms) '
              '| no spinning / JAX | DeformConv (ms) | DeformConv / JAX | max abs diff |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in result['ops']:
      lines.append(f"| {r['N']} | {r['H']}x{r['W']} | {r['C_in']}->{r['C_out']} | {r['jax_ms']:.2f} | "
                   f"{r['onnx_ms']:.2f} | {r['onnx_over_jax']:.2f}x | {r['onnx_no_spin_ms']:.2f} | "
                   f"{r['onnx_no_spin_over_jax']:.2f}x | {r['native_ms']:.2f} | {r['native_over_jax']:.2f}x | "
                   f"{r['max_abs_diff']:.1e} |")
  return '\n'.join(lines) + '\n'


def run(cfg) -> dict:
  """The classifiers and (with `ops`) deform_conv2d, exported and timed (see the module's docstring)."""
  names = config_names(cfg, 'classifiers', CLASSIFIERS)
  op_shapes = tuple(tuple(s) for s in cfg.op_shapes) if cfg.ops else ()
  per_round = max(1, -(-cfg.repeats // cfg.rounds))
  return {
      'benchmark': 'ONNX export (onnxruntime, CPU execution provider) vs JAX jit on CPU, float32',
      **benchmark_metadata(**versions()),
      'method': f'median of {cfg.rounds} interleaved rounds x {per_round} runs after '
                'warm-up; JAX: jax.jit + block_until_ready; onnxruntime: InferenceSession.run with '
                'ORT_ENABLE_ALL, default threads, with and without intra-op spinning; both on all cores, on a machine '
                'shared with other work',
      'shapes': [f"{n}: batch {'/'.join(map(str, cfg.batches))} of {'x'.join(map(str, CLASSIFIERS[n][1]))}"
                 for n in names] + [f'deform_conv2d N={n} {hw}x{hw} {c}->{c} 3x3' for n, hw, c in op_shapes],
      'classifiers': bench_classifiers(names, tuple(cfg.batches), cfg.repeats, cfg.rounds, cfg.profile),
      'ops': bench_ops(op_shapes, max(6, cfg.repeats // 4), cfg.rounds) if op_shapes else [],
  }


def main(args=None) -> dict:
  """`python -m experiments.bench_onnx [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  return bench_main(args, 'experiments.bench_onnx', DEFAULT_CONFIG, run, to_markdown, lambda cfg: 'bench_onnx_cpu')


if __name__ == '__main__':
  main()
