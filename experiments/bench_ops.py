"""Benchmark deform_conv2d against lax.conv_general_dilated (and torchvision where present).

Forward and forward+backward of a 3x3, stride 1, pad 1 deformable conv with
mask, jitted, timed side by side in one process: median of many runs after
warm-up, with jax.block_until_ready. Ratios are the figures to quote; absolute
times only with the device named. Writes
experiments/results/bench_ops_<device>.json and .md.

  python -m experiments.bench_ops                     # the issue's three shapes
  python -m experiments.bench_ops --shapes 64,56,128 --repeats 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

import deformjax
from deformjax.ops import deform_conv2d

DEFAULT_SHAPES = ((64, 7, 32), (64, 16, 64), (8, 64, 64))  # (N, H=W, C_in=C_out)
RESULTS = pathlib.Path(__file__).parent / 'results'


def median_ms(fn, args, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    model = platform.processor() or 'cpu'
    try:
      for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
    except OSError:
      pass
    import os
    return f'cpu ({model}, {os.cpu_count()} cores)'
  return f'{dev.platform} ({dev.device_kind})'


def make_problem(n, hw, c, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (n, hw, hw, c), dtype)
  off = jax.random.uniform(k[1], (n, hw, hw, 18), dtype, -2.0, 2.0)
  mask = jax.random.uniform(k[2], (n, hw, hw, 9), dtype)
  w = (jax.random.normal(k[3], (3, 3, c, c), jnp.float32) / np.sqrt(9 * c)).astype(dtype)
  cot = jax.random.normal(k[4], (n, hw, hw, c), dtype)
  return x, off, mask, w, cot


def ours_fns(chunk_size):
  def fwd(x, off, mask, w):
    return deform_conv2d(x, off, w, mask, padding=1, chunk_size=chunk_size)

  def fwd_bwd(x, off, mask, w, cot):
    out, vjp = jax.vjp(fwd, x, off, mask, w)
    return out, vjp(cot)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def conv_fns():
  def fwd(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def fwd_bwd(x, w, cot):
    out, vjp = jax.vjp(fwd, x, w)
    return out, vjp(cot)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def torchvision_times(x, off, mask, w, cot, repeats):
  """torchvision.ops.deform_conv2d on the same numbers, or None where it is not importable."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  if x.dtype != jnp.float32:
    return None  # torchvision's kernels have no bf16/f16 path
  t = lambda a, perm: torch.tensor(np.asarray(a).transpose(perm), device=dev).contiguous().requires_grad_(True)
  tx, toff, tm = t(x, (0, 3, 1, 2)), t(off, (0, 3, 1, 2)), t(mask, (0, 3, 1, 2))
  tw = t(w, (3, 2, 0, 1))
  tcot = torch.tensor(np.asarray(cot).transpose(0, 3, 1, 2), device=dev).contiguous()
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  def fwd():
    with torch.no_grad():
      return torchvision.ops.deform_conv2d(tx, toff, tw, padding=(1, 1), mask=tm)

  def fwd_bwd():
    out = torchvision.ops.deform_conv2d(tx, toff, tw, padding=(1, 1), mask=tm)
    return torch.autograd.grad(out, (tx, toff, tm, tw), tcot)

  def timed(fn):
    for _ in range(2):
      fn()
    sync()
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      sync()
      ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)

  return {'device': dev, 'torch': torch.__version__, 'torchvision': torchvision.__version__,
          'fwd_ms': timed(fwd), 'fwd_bwd_ms': timed(fwd_bwd)}


def temp_bytes(jitted, *args) -> int | None:
  try:
    return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
  except Exception:  # memory_analysis is not implemented on every backend
    return None


def run(shapes, dtype_name: str, repeats: int, chunk_size: int | None) -> dict:
  dtype = jnp.dtype(dtype_name)
  rows = []
  for n, hw, c in shapes:
    x, off, mask, w, cot = make_problem(n, hw, c, dtype)
    o_fwd, o_fb = ours_fns(chunk_size)
    c_fwd, c_fb = conv_fns()
    row = {'N': n, 'H': hw, 'W': hw, 'C_in': c, 'C_out': c, 'kernel': [3, 3], 'dtype': dtype_name}
    # Interleave ours and the reference so drift in machine load hits both.
    row['conv_fwd_ms'] = median_ms(c_fwd, (x, w), repeats)
    row['ours_fwd_ms'] = median_ms(o_fwd, (x, off, mask, w), repeats)
    row['conv_fwd_bwd_ms'] = median_ms(c_fb, (x, w, cot), repeats)
    row['ours_fwd_bwd_ms'] = median_ms(o_fb, (x, off, mask, w, cot), repeats)
    row['fwd_ratio_vs_conv'] = row['ours_fwd_ms'] / row['conv_fwd_ms']
    row['fwd_bwd_ratio_vs_conv'] = row['ours_fwd_bwd_ms'] / row['conv_fwd_bwd_ms']
    row['ours_fwd_bwd_temp_bytes'] = temp_bytes(o_fb, x, off, mask, w, cot)
    row['conv_fwd_bwd_temp_bytes'] = temp_bytes(c_fb, x, w, cot)
    tv = torchvision_times(x, off, mask, w, cot, repeats)
    if tv is not None:
      row['torchvision'] = tv
      row['fwd_ratio_vs_torchvision'] = row['ours_fwd_ms'] / tv['fwd_ms']
      row['fwd_bwd_ratio_vs_torchvision'] = row['ours_fwd_bwd_ms'] / tv['fwd_bwd_ms']
    rows.append(row)
    print(
        f"N={n} {hw}x{hw} {c}->{c} {dtype_name}: fwd {row['ours_fwd_ms']:.2f} ms vs conv {row['conv_fwd_ms']:.2f} ms "
        f"({row['fwd_ratio_vs_conv']:.2f}x); fwd+bwd {row['ours_fwd_bwd_ms']:.2f} ms vs "
        f"{row['conv_fwd_bwd_ms']:.2f} ms ({row['fwd_bwd_ratio_vs_conv']:.2f}x)"
        + (f"; vs torchvision fwd+bwd {row['fwd_bwd_ratio_vs_torchvision']:.2f}x" if tv else ''),
        flush=True,
    )
  return {
      'benchmark': 'deform_conv2d vs lax.conv_general_dilated, 3x3 stride 1 pad 1, with mask',
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': device_name(),
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'jaxlib': jaxlib.__version__, 'deformjax': deformjax.__version__},
      'method': f'median of {repeats} runs after 2 warm-up runs, jax.jit, block_until_ready; '
                'fwd+bwd = jax.vjp w.r.t. every input',
      'chunk_size': chunk_size,
      'rows': rows,
  }


def to_markdown(result: dict) -> str:
  lines = [
      f"# {result['benchmark']}",
      '',
      f"Device: {result['device']}. Versions: "
      + ', '.join(f'{k} {v}' for k, v in result['versions'].items())
      + f". Method: {result['method']}. Date: {result['date']}.",
      '',
      '| N | H x W | C_in -> C_out | dtype | conv fwd (ms) | ours fwd (ms) | fwd ratio | conv fwd+bwd (ms) '
      '| ours fwd+bwd (ms) | fwd+bwd ratio | torchvision fwd+bwd (ms) | ours / torchvision |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    tv = r.get('torchvision')
    lines.append(
        f"| {r['N']} | {r['H']}x{r['W']} | {r['C_in']}->{r['C_out']} | {r['dtype']} | {r['conv_fwd_ms']:.2f} "
        f"| {r['ours_fwd_ms']:.2f} | {r['fwd_ratio_vs_conv']:.2f}x | {r['conv_fwd_bwd_ms']:.2f} "
        f"| {r['ours_fwd_bwd_ms']:.2f} | {r['fwd_bwd_ratio_vs_conv']:.2f}x "
        f"| {tv['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ratio_vs_torchvision']:.2f}x |" if tv else
        f"| {r['N']} | {r['H']}x{r['W']} | {r['C_in']}->{r['C_out']} | {r['dtype']} | {r['conv_fwd_ms']:.2f} "
        f"| {r['ours_fwd_ms']:.2f} | {r['fwd_ratio_vs_conv']:.2f}x | {r['conv_fwd_bwd_ms']:.2f} "
        f"| {r['ours_fwd_bwd_ms']:.2f} | {r['fwd_bwd_ratio_vs_conv']:.2f}x | not importable | - |"
    )
  return '\n'.join(lines) + '\n'


def parse_shape(text: str) -> tuple[int, int, int]:
  parts = tuple(int(p) for p in text.split(','))
  if len(parts) != 3:
    raise argparse.ArgumentTypeError(f'--shapes takes N,HW,C triples, got {text!r}')
  return parts  # type: ignore[return-value]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shapes', type=parse_shape, nargs='+', default=list(DEFAULT_SHAPES), help='N,HW,C triples')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--chunk-size', type=int, default=None)
  parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
  parser.add_argument('--tag', default=None, help='file name suffix; default: the platform (cpu/gpu/tpu)')
  args = parser.parse_args(argv)
  result = run(args.shapes, args.dtype, args.repeats, args.chunk_size)
  tag = args.tag or jax.devices()[0].platform + ('' if args.dtype == 'float32' else f'_{args.dtype}')
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f'bench_ops_{tag}.json').write_text(json.dumps(result, indent=2) + '\n')
  (args.out / f'bench_ops_{tag}.md').write_text(to_markdown(result))
  print(f"wrote {args.out / f'bench_ops_{tag}.json'} and .md")
  return result


if __name__ == '__main__':
  main()
