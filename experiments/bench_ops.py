"""Benchmark deform_conv2d against lax.conv_general_dilated (and torchvision where present).

Forward and forward+backward of a 3x3, stride 1, pad 1 deformable conv with
mask, jitted, timed side by side in one process: median of many runs after
warm-up, with jax.block_until_ready. Ratios are the figures to quote; absolute
times only with the device named. Writes bench_ops_<platform>.json and .md
under `--out` (runs/; `--out experiments/results` refreshes the committed ones).
The config (experiments/configs/bench_ops.py) holds every setting:

  python -m experiments.bench_ops                     # the platform's default shapes
  python -m experiments.bench_ops --config.shapes='((64, 56, 128),)' --config.repeats=10
  python -m experiments.bench_ops --config.baseline=52fdbf0  # before/after, side by side
  python -m experiments.bench_ops --config.dtype=bfloat16 --config.deterministic_gradients=True   # on a GPU
  python -m experiments.bench_ops --config=experiments/configs/bench_ops.py:family   # dcnv3 / dcnv4 / ms_deform_attn
  python -m experiments.bench_ops --config=experiments/configs/bench_ops.py:family --config.batch=4 \\
    --config.msda_batch=1                             # the same, shrunk for a small CPU
  python -m experiments.bench_ops --config=experiments/configs/bench_ops.py:runlocal  # a smoke test

Default shapes: on CPU the three the CPU work was tuned on; on GPU/TPU DCNv4's
four operator shapes (64x56x56x128 ... 64x7x7x1024) and the classifier shape
64x14x14x32. torchvision (where importable) runs the same numbers in float32,
or in float16 when the dtype is bfloat16/float16 (it has no bf16 kernel).
`deterministic_gradients=True` also times forward+backward with deterministic gradients.

Timings are interleaved (`experiments.common.interleaved_ms`): each of `rounds`
rounds times every function (ours, lax.conv, the baseline, torchvision)
`repeats / rounds` times in turn, so drift in machine load hits all of them
alike; the figure is the median of all those runs.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deformjax.ops import deform_conv2d
from deformjax.train.config import ConfigError
from experiments.common import bench_main, benchmark_header, benchmark_metadata, interleaved_ms, jax_call

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'bench_ops.py'
DEFAULT_SHAPES = ((64, 7, 32), (64, 16, 64), (8, 64, 64))  # (N, H=W, C_in=C_out), CPU
ACCELERATOR_SHAPES = ((64, 56, 128), (64, 28, 256), (64, 14, 512), (64, 7, 1024), (64, 14, 32))


def load_baseline(rev: str):
  """deform_conv2d as it was at git revision `rev` (same helpers from the checkout).

  Lets a change to the op be timed against its predecessor in one process. It
  works while `deformjax/ops/deform_conv.py` at `rev` imports helpers that still
  exist; the error says which import broke otherwise.
  """
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    source = subprocess.run(
        ['git', 'show', f'{rev}:deformjax/ops/deform_conv.py'], cwd=root, check=True,
        capture_output=True, text=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(f'error: --config.baseline={rev}: cannot read deform_conv.py at that revision ({e})') from None
  path = pathlib.Path(tempfile.mkdtemp()) / f'deform_conv_{rev}.py'
  path.write_text(source)
  spec = importlib.util.spec_from_file_location(f'deform_conv_{rev}', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  try:
    spec.loader.exec_module(module)
  except ImportError as e:
    raise SystemExit(f'error: --config.baseline={rev}: its deform_conv.py no longer imports here ({e})') from None
  return module.deform_conv2d


def make_problem(n, hw, c, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (n, hw, hw, c), dtype)
  off = jax.random.uniform(k[1], (n, hw, hw, 18), dtype, -2.0, 2.0)
  mask = jax.random.uniform(k[2], (n, hw, hw, 9), dtype)
  w = (jax.random.normal(k[3], (3, 3, c, c), jnp.float32) / np.sqrt(9 * c)).astype(dtype)
  cot = jax.random.normal(k[4], (n, hw, hw, c), dtype)
  return x, off, mask, w, cot


def ours_fns(chunk_size, op=deform_conv2d, **kw):
  def fwd(x, off, mask, w):
    return op(x, off, w, mask, padding=1, chunk_size=chunk_size, **kw)

  def fwd_bwd(x, off, mask, w, cot):
    out, vjp = jax.vjp(fwd, x, off, mask, w)
    return out, vjp(cot)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def vjp_fns(fn):
  def fwd_bwd(*args):
    out, vjp = jax.vjp(fn, *args[:-1])
    return out, vjp(args[-1])

  return jax.jit(fn), jax.jit(fwd_bwd)


def conv_fns(precision=None, feature_group_count: int = 1):
  """3x3 `lax.conv` (stride 1, pad 1, NHWC), forward and forward+backward; depthwise with `feature_group_count=C`."""
  return vjp_fns(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision,
      feature_group_count=feature_group_count))


def torchvision_cases(x, off, mask, w, cot):
  """(versions, {'tv_fwd': call, 'tv_fwd_bwd': call}) running torchvision.ops.deform_conv2d on
  the same numbers, for `interleaved_ms`; None where it is not importable."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  if x.dtype != jnp.float32 and dev == 'cpu':
    return None  # torchvision's CPU kernel has no half-precision path
  # torchvision has no bf16 kernel ("deformable_im2col" not implemented for 'BFloat16'):
  # the half-precision row runs float16 on the same numbers.
  tdtype = torch.float32 if x.dtype == jnp.float32 else torch.float16
  host = lambda a, perm: np.asarray(a.astype(jnp.float32)).transpose(perm)
  t = lambda a, perm: torch.tensor(host(a, perm), device=dev, dtype=tdtype).contiguous().requires_grad_(True)
  tx, toff, tm = t(x, (0, 3, 1, 2)), t(off, (0, 3, 1, 2)), t(mask, (0, 3, 1, 2))
  tw = t(w, (3, 2, 0, 1))
  tcot = torch.tensor(host(cot, (0, 3, 1, 2)), device=dev, dtype=tdtype).contiguous()
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  def fwd():
    with torch.no_grad():
      return torchvision.ops.deform_conv2d(tx, toff, tw, padding=(1, 1), mask=tm)

  def fwd_bwd():
    out = torchvision.ops.deform_conv2d(tx, toff, tw, padding=(1, 1), mask=tm)
    return torch.autograd.grad(out, (tx, toff, tm, tw), tcot)

  synced = lambda fn: lambda: (fn(), sync())
  versions = {'device': dev, 'dtype': str(tdtype).replace('torch.', ''), 'torch': torch.__version__,
              'torchvision': torchvision.__version__}
  return versions, {'tv_fwd': synced(fwd), 'tv_fwd_bwd': synced(fwd_bwd)}


def temp_bytes(jitted, *args) -> int | None:
  try:
    return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
  except Exception:  # memory_analysis is not implemented on every backend
    return None


def conv_shapes(cfg) -> tuple[tuple[int, int, int], ...]:
  """The config's `shapes` as (N, H=W, C) triples; () gives the platform's defaults."""
  shapes = tuple(cfg.shapes) or (DEFAULT_SHAPES if jax.default_backend() == 'cpu' else ACCELERATOR_SHAPES)
  if not all(isinstance(s, tuple) and len(s) == 3 and all(isinstance(v, int) and v > 0 for v in s) for s in shapes):
    raise ConfigError(f"--config.shapes: (N, HW, C) triples of positive ints, e.g. '((64, 56, 128),)'; got {cfg.shapes}")
  return shapes


def conv_cases(cfg, problem, base_op) -> tuple[dict, dict]:
  """({name: timed call}, {name: jitted function, for its temporary memory}) of one shape."""
  x, off, mask, w, cot = problem
  o_fwd, o_fb = ours_fns(cfg.chunk_size, precision=cfg.precision)
  c_fwd, c_fb = conv_fns(cfg.precision)
  cases = {'conv_fwd': jax_call(c_fwd, x, w), 'ours_fwd': jax_call(o_fwd, x, off, mask, w),
           'conv_fwd_bwd': jax_call(c_fb, x, w, cot), 'ours_fwd_bwd': jax_call(o_fb, x, off, mask, w, cot)}
  jitted = {'ours': o_fb, 'conv': c_fb}
  if base_op is not None:
    b_fwd, jitted['base'] = ours_fns(cfg.chunk_size, base_op, precision=cfg.precision)
    cases['base_fwd'] = jax_call(b_fwd, x, off, mask, w)
    cases['base_fwd_bwd'] = jax_call(jitted['base'], x, off, mask, w, cot)
  if cfg.deterministic_gradients:
    det = ours_fns(cfg.chunk_size, precision=cfg.precision, deterministic_gradients=True)[1]
    cases['det_fwd_bwd'] = jax_call(det, x, off, mask, w, cot)
  return cases, jitted


def conv_row(cfg, shape, base_op) -> dict:
  """One shape's timings, ratios and temporary memory (the JSON row)."""
  n, hw, c = shape
  problem = make_problem(n, hw, c, jnp.dtype(cfg.dtype))
  x, off, mask, w, cot = problem
  cases, jitted = conv_cases(cfg, problem, base_op)
  tv = torchvision_cases(*problem) if cfg.torchvision else None
  if tv is not None:
    cases.update(tv[1])
  times = interleaved_ms(cases, cfg.rounds, per_round(cfg))
  row = {'N': n, 'H': hw, 'W': hw, 'C_in': c, 'C_out': c, 'kernel': [3, 3], 'dtype': cfg.dtype}
  row.update({f'{name}_ms': t for name, t in times.items() if not name.startswith('tv_')})
  row['fwd_ratio_vs_conv'] = row['ours_fwd_ms'] / row['conv_fwd_ms']
  row['fwd_bwd_ratio_vs_conv'] = row['ours_fwd_bwd_ms'] / row['conv_fwd_bwd_ms']
  if base_op is not None:
    row['base_fwd_ratio_vs_conv'] = row['base_fwd_ms'] / row['conv_fwd_ms']
    row['base_fwd_bwd_ratio_vs_conv'] = row['base_fwd_bwd_ms'] / row['conv_fwd_bwd_ms']
    row['base_fwd_bwd_temp_bytes'] = temp_bytes(jitted['base'], x, off, mask, w, cot)
  row['ours_fwd_bwd_temp_bytes'] = temp_bytes(jitted['ours'], x, off, mask, w, cot)
  row['conv_fwd_bwd_temp_bytes'] = temp_bytes(jitted['conv'], x, w, cot)
  row['columns_bytes'] = n * hw * hw * 9 * c * 4  # the whole float32 columns buffer
  if cfg.deterministic_gradients:
    row['det_fwd_bwd_ratio_vs_default'] = row['det_fwd_bwd_ms'] / row['ours_fwd_bwd_ms']
  if tv is not None:
    row['torchvision'] = {**tv[0], 'fwd_ms': times['tv_fwd'], 'fwd_bwd_ms': times['tv_fwd_bwd']}
    row['fwd_ratio_vs_torchvision'] = row['ours_fwd_ms'] / times['tv_fwd']
    row['fwd_bwd_ratio_vs_torchvision'] = row['ours_fwd_bwd_ms'] / times['tv_fwd_bwd']
  return row


def conv_line(row: dict, baseline: str | None) -> str:
  """The progress line of one shape's row."""
  tv, det = 'torchvision' in row, 'det_fwd_bwd_ms' in row
  return (f"N={row['N']} {row['H']}x{row['W']} {row['C_in']}->{row['C_out']} {row['dtype']}: fwd "
          f"{row['ours_fwd_ms']:.2f} ms vs conv {row['conv_fwd_ms']:.2f} ms ({row['fwd_ratio_vs_conv']:.2f}x); fwd+bwd "
          f"{row['ours_fwd_bwd_ms']:.2f} ms vs {row['conv_fwd_bwd_ms']:.2f} ms ({row['fwd_bwd_ratio_vs_conv']:.2f}x)"
          + (f"; vs torchvision fwd {row['fwd_ratio_vs_torchvision']:.2f}x, fwd+bwd "
             f"{row['fwd_bwd_ratio_vs_torchvision']:.2f}x" if tv else '')
          + (f"; deterministic fwd+bwd {row['det_fwd_bwd_ratio_vs_default']:.2f}x default" if det else '')
          + (f"; baseline {baseline}: {row['base_fwd_ratio_vs_conv']:.2f}x / {row['base_fwd_bwd_ratio_vs_conv']:.2f}x"
             if baseline else ''))


def per_round(cfg) -> int:
  return max(1, -(-cfg.repeats // cfg.rounds))


def run_conv(cfg) -> dict:
  """deform_conv2d against lax.conv at every shape of the config (see the module's docstring)."""
  if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(f'--config.dtype: float32, bfloat16 or float16; got {cfg.dtype!r}')
  shapes = conv_shapes(cfg)
  base_op = load_baseline(cfg.baseline) if cfg.baseline else None
  rows = []
  for shape in shapes:
    rows.append(conv_row(cfg, shape, base_op))
    print(conv_line(rows[-1], cfg.baseline), flush=True)
  return {
      'benchmark': 'deform_conv2d vs lax.conv_general_dilated, 3x3 stride 1 pad 1, with mask',
      **benchmark_metadata(),
      'method': f'median of {cfg.rounds} interleaved rounds x {per_round(cfg)} runs after 2 warm-up runs, jax.jit, '
                'block_until_ready; fwd+bwd = jax.vjp w.r.t. every input',
      'shapes': [f'N={n} {hw}x{hw} {c}->{c} 3x3' for n, hw, c in shapes],
      'precision': cfg.precision or 'default',
      'chunk_size': cfg.chunk_size,
      'baseline': cfg.baseline,
      'rows': rows,
  }


def torch_cases(fn, arrays, cot):
  """{'torch_fwd', 'torch_fwd_bwd'} calls of a torch function on the same float32 numbers, or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  tensors = [torch.tensor(np.asarray(a, np.float32), device=dev, requires_grad=True) for a in arrays]
  tcot = torch.tensor(np.asarray(cot, np.float32), device=dev)
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  def fwd():
    with torch.no_grad():
      out = fn(*tensors)
    sync()
    return out

  def fwd_bwd():
    grads = torch.autograd.grad(fn(*tensors), tensors, tcot)
    sync()
    return grads

  return {'torch_fwd': fwd, 'torch_fwd_bwd': fwd_bwd}


def family_problems(cfg):
  """(name, shape row, ours, torch reference or None, arrays, conv arrays) for every family benchmark case: the
  config's `family_shapes` (N, H=W, groups, C; N replaced by `batch` where set) and its `msda` problem (batch
  replaced by `msda_batch` where set)."""
  batch, msda_batch = cfg.batch, cfg.msda_batch
  from deformjax.ops import dcnv3, dcnv4, ms_deform_attn, offset_mask_channels
  try:
    from references.torch_reference import dcnv3_grid_sample, msda_transformers
  except ImportError:  # no torch
    dcnv3_grid_sample = msda_transformers = None
  rng = np.random.default_rng(0)
  kw = dict(kernel_size=3, padding=1, offset_scale=1.0)
  torch_kw = dict(kernel=(3, 3), stride=1, pad=1, dilation=1, offset_scale=1.0, remove_center=False)
  for n, hw, g, c in cfg.family_shapes:
    n = batch or n
    x = rng.normal(size=(n, hw, hw, c)).astype(np.float32)
    off = rng.uniform(-2, 2, size=(n, hw, hw, g * 18)).astype(np.float32)
    mask = rng.uniform(0, 1, size=(n, hw, hw, g * 9)).astype(np.float32)
    om = np.concatenate([off.reshape(n, hw, hw, g, 18), mask.reshape(n, hw, hw, g, 9)], -1).reshape(n, hw, hw, -1)
    om = np.concatenate([om, np.zeros((n, hw, hw, offset_mask_channels(g, 9) - om.shape[-1]), np.float32)], -1)
    row = {'N': n, 'H': hw, 'W': hw, 'C': c, 'groups': g, 'kernel': [3, 3], 'sampled_bytes': n * hw * hw * 9 * c * 4}
    conv = (x, np.full((3, 3, 1, c), 1 / 9, np.float32))
    t3 = None if dcnv3_grid_sample is None else (
        lambda x, o, m, g=g: dcnv3_grid_sample(x, o, m, groups=g, **torch_kw))
    yield 'dcnv3', row, lambda x, o, m, g=g: dcnv3(x, o, m, groups=g, **kw), t3, (x, off, mask), conv
    t4 = None if dcnv3_grid_sample is None else (
        lambda x, om, g=g, n=n, hw=hw: dcnv3_grid_sample(
            x, *_split_offset_mask(om, n, hw, g), groups=g, **torch_kw))
    yield 'dcnv4', row, lambda x, om, g=g: dcnv4(x, om, groups=g, **kw), t4, (x, om), conv
  spec = dict(cfg.msda.to_dict(), n=msda_batch or cfg.msda.n)
  n, heads, d, points = spec['n'], spec['heads'], spec['d'], spec['points']
  levels = tuple(tuple(lv) for lv in spec['levels'])
  rows = sum(h * w for h, w in levels)
  value = rng.normal(size=(n, rows, heads, d)).astype(np.float32)
  loc = rng.uniform(0, 1, size=(n, rows, heads, len(levels), points, 2)).astype(np.float32)
  attn = rng.uniform(0, 1, size=(n, rows, heads, len(levels), points)).astype(np.float32)
  row = {'N': n, 'levels': [list(lv) for lv in levels], 'queries': rows, 'heads': heads, 'D': d, 'points': points,
         'sampled_bytes': n * rows * heads * len(levels) * points * d * 4}
  reference = None if msda_transformers is None else msda_transformers()
  t = None if reference is None else (lambda v, lo, a: reference(v, levels, lo, a))
  # The conv baseline: a 3x3 depthwise conv over the largest level's map, M*D channels.
  conv = (rng.normal(size=(n,) + levels[0] + (heads * d,)).astype(np.float32),
          np.full((3, 3, 1, heads * d), 1 / 9, np.float32))
  yield 'ms_deform_attn', row, lambda v, lo, a: ms_deform_attn(v, levels, lo, a), t, (value, loc, attn), conv


def _split_offset_mask(om, n, hw, g):
  per_group = om[..., :g * 27].reshape(n, hw, hw, g, 27)
  return per_group[..., :18].reshape(n, hw, hw, -1), per_group[..., 18:].reshape(n, hw, hw, -1)


def run_family(cfg) -> dict:
  """dcnv3, dcnv4 and ms_deform_attn against a depthwise lax.conv and the PyTorch references."""
  repeats, rounds, torch_reference = cfg.repeats, cfg.rounds, cfg.torchvision
  per_round = max(1, -(-repeats // rounds))
  rows = []
  for name, row, ours, reference, arrays, conv in family_problems(cfg):
    o_fwd, o_fb = vjp_fns(ours)
    args = [jnp.asarray(a) for a in arrays]
    out = o_fwd(*args)
    cot = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
    c_fwd, c_fb = conv_fns(feature_group_count=conv[0].shape[-1])
    cx, cw = (jnp.asarray(a) for a in conv)
    ccot = jax.random.normal(jax.random.key(2), cx.shape, cx.dtype)
    cases = {'conv_fwd': jax_call(c_fwd, cx, cw), 'conv_fwd_bwd': jax_call(c_fb, cx, cw, ccot),
             'ours_fwd': jax_call(o_fwd, *args), 'ours_fwd_bwd': jax_call(o_fb, *args, cot)}
    tc = torch_cases(reference, arrays, cot) if (reference is not None and torch_reference) else None
    if tc:
      cases.update(tc)
    times = interleaved_ms(cases, rounds, per_round)
    row = {'op': name, **row, **{f'{k}_ms': v for k, v in times.items()}}
    row['fwd_ratio_vs_conv'] = times['ours_fwd'] / times['conv_fwd']
    row['fwd_bwd_ratio_vs_conv'] = times['ours_fwd_bwd'] / times['conv_fwd_bwd']
    if tc:
      row['fwd_ratio_vs_torch'] = times['ours_fwd'] / times['torch_fwd']
      row['fwd_bwd_ratio_vs_torch'] = times['ours_fwd_bwd'] / times['torch_fwd_bwd']
    row['ours_fwd_bwd_temp_bytes'] = temp_bytes(o_fb, *args, cot)
    if row['ours_fwd_bwd_temp_bytes'] is not None:
      row['temp_ratio_vs_sampled'] = row['ours_fwd_bwd_temp_bytes'] / row['sampled_bytes']
    rows.append(row)
    print(f"{name} {row.get('N')} {row.get('H', '')}: fwd {times['ours_fwd']:.2f} ms ({row['fwd_ratio_vs_conv']:.2f}x "
          f"conv), fwd+bwd {times['ours_fwd_bwd']:.2f} ms ({row['fwd_bwd_ratio_vs_conv']:.2f}x conv)"
          + (f"; vs torch {row['fwd_ratio_vs_torch']:.2f}x / {row['fwd_bwd_ratio_vs_torch']:.2f}x" if tc else '')
          + (f"; temp {row['temp_ratio_vs_sampled']:.2f}x sampled" if 'temp_ratio_vs_sampled' in row else ''),
          flush=True)
  versions = {}
  try:
    import torch
    versions['torch'] = torch.__version__
    import transformers
    versions['transformers'] = transformers.__version__
  except ImportError:
    pass
  return {
      'benchmark': 'deformable family (dcnv3, dcnv4, ms_deform_attn) vs a 3x3 depthwise lax.conv and the PyTorch '
                   'references (InternImage grid_sample formulation, transformers multi_scale_deformable_attention)',
      **benchmark_metadata(**versions),
      'method': f'median of {rounds} interleaved rounds x {per_round} runs after 2 warm-up runs, jax.jit, '
                'block_until_ready; fwd+bwd = vjp w.r.t. every input; float32; 3x3 kernels, pad 1, stride 1',
      'shapes': list(dict.fromkeys(family_shape(r) for r in rows)),
      'shrunk': {'batch': cfg.batch, 'msda_batch': cfg.msda_batch},
      'rows': rows,
  }


def family_shape(r: dict) -> str:
  """A family row's shape in words."""
  if 'H' in r:
    return f"N={r['N']} {r['H']}x{r['W']}, {r['groups']} groups of {r['C'] // r['groups']}"
  return (f"N={r['N']}, levels {'/'.join(str(h) for h, _ in r['levels'])}, {r['heads']}x{r['D']}, "
          f"{r['points']} points, {r['queries']} queries")


def family_markdown(result: dict) -> str:
  head = ['op', 'shape', 'conv fwd / fwd+bwd (ms)', 'ours fwd / fwd+bwd (ms)', 'vs conv fwd', 'vs conv fwd+bwd',
          'torch fwd / fwd+bwd (ms)', 'vs torch fwd', 'vs torch fwd+bwd', 'fwd+bwd temp / sampled']
  shrunk = {k: v for k, v in result['shrunk'].items() if v}
  lines = [f"# {result['benchmark']}", '',
           benchmark_header(result) + (f' Shrunk from the reference shapes: {shrunk}.' if shrunk else ''), '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in result['rows']:
    shape = family_shape(r)
    tc = 'torch_fwd_ms' in r
    cells = [r['op'], shape, f"{r['conv_fwd_ms']:.2f} / {r['conv_fwd_bwd_ms']:.2f}",
             f"{r['ours_fwd_ms']:.2f} / {r['ours_fwd_bwd_ms']:.2f}", f"{r['fwd_ratio_vs_conv']:.2f}x",
             f"{r['fwd_bwd_ratio_vs_conv']:.2f}x",
             f"{r['torch_fwd_ms']:.2f} / {r['torch_fwd_bwd_ms']:.2f}" if tc else 'not run',
             f"{r['fwd_ratio_vs_torch']:.2f}x" if tc else '-', f"{r['fwd_bwd_ratio_vs_torch']:.2f}x" if tc else '-',
             f"{r['temp_ratio_vs_sampled']:.2f}x" if 'temp_ratio_vs_sampled' in r else '-']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def to_markdown(result: dict) -> str:
  base = result.get('baseline')
  head = ['N', 'H x W', 'C_in -> C_out', 'dtype', 'conv fwd (ms)', 'ours fwd (ms)', 'fwd ratio']
  head += [f'fwd ratio at {base}'] if base else []
  head += ['conv fwd+bwd (ms)', 'ours fwd+bwd (ms)', 'fwd+bwd ratio']
  head += [f'fwd+bwd ratio at {base}'] if base else []
  det = any('det_fwd_bwd_ms' in r for r in result['rows'])
  head += ['deterministic fwd+bwd (ms)'] if det else []
  head += ['fwd+bwd temp (MiB)', 'columns (MiB)', 'torchvision fwd / fwd+bwd (ms)',
           'ours / torchvision fwd', 'ours / torchvision fwd+bwd']
  lines = [
      f"# {result['benchmark']}",
      '',
      benchmark_header(result)
      + (f' Baseline: deform_conv2d at git revision {base}, timed in the same rounds.' if base else ''),
      '',
      '| ' + ' | '.join(head) + ' |',
      '|' + '---|' * len(head),
  ]
  mib = lambda b: '-' if b is None else f'{b / 2**20:.0f}'
  for r in result['rows']:
    tv = r.get('torchvision')
    cells = [r['N'], f"{r['H']}x{r['W']}", f"{r['C_in']}->{r['C_out']}", r['dtype'], f"{r['conv_fwd_ms']:.2f}",
             f"{r['ours_fwd_ms']:.2f}", f"{r['fwd_ratio_vs_conv']:.2f}x"]
    cells += [f"{r['base_fwd_ratio_vs_conv']:.2f}x"] if base else []
    cells += [f"{r['conv_fwd_bwd_ms']:.2f}", f"{r['ours_fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_ratio_vs_conv']:.2f}x"]
    cells += [f"{r['base_fwd_bwd_ratio_vs_conv']:.2f}x"] if base else []
    cells += [f"{r['det_fwd_bwd_ms']:.2f}"] if det else []
    cells += [mib(r.get('ours_fwd_bwd_temp_bytes')), mib(r.get('columns_bytes'))]
    cells += ([f"{tv['fwd_ms']:.2f} / {tv['fwd_bwd_ms']:.2f} ({tv.get('dtype', 'float32')})",
               f"{r['fwd_ratio_vs_torchvision']:.2f}x", f"{r['fwd_bwd_ratio_vs_torchvision']:.2f}x"]
              if tv else ['not importable', '-', '-'])
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def run(cfg) -> dict:
  """The benchmark the config asks for: the family (`family=True`) or deform_conv2d."""
  return run_family(cfg) if cfg.family else run_conv(cfg)


def markdown(result: dict) -> str:
  return family_markdown(result) if 'shrunk' in result else to_markdown(result)


def file_name(cfg) -> str:
  """bench_ops_<platform>[_<dtype>], bench_ops_family_<platform>; `tag` replaces what follows bench_ops_[family_]."""
  platform = jax.devices()[0].platform
  if cfg.family:
    return 'bench_ops_family_' + (cfg.tag or platform)
  return 'bench_ops_' + (cfg.tag or platform + ('' if cfg.dtype == 'float32' else f'_{cfg.dtype}'))


def main(args=None) -> dict:
  """`python -m experiments.bench_ops [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  return bench_main(args, 'experiments.bench_ops', DEFAULT_CONFIG, run, markdown, file_name)


if __name__ == '__main__':
  main()
