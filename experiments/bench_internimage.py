"""InternImage-T and FlashInternImage-T inference on CPU: ours (jitted) beside the reference PyTorch models.

One process, the same weights on both sides: the reference model is built at its T configuration,
its parameters moved off their initialisation (the offset heads start at zero, which would sample
the regular grid only), converted with `deformjax.convert.from_internimage` /
`from_flash_internimage`, and both run the same batch (NCHW for PyTorch, NHWC for ours). Median
of interleaved runs after warm-up, `jax.block_until_ready` / `torch.no_grad`.

The reference sides (need torch + timm and a checkout of each repository):

- InternImage (`internimage_src`, by default `$DEFORMJAX_INTERNIMAGE_SRC`: its `classification/` folder): the model's own
  pure-PyTorch core, `core_op='DCNv3_pytorch'` (`dcnv3_core_pytorch`, grid_sample), with the
  compiled extension's import stubbed.
- FlashInternImage (`dcnv4_src`, by default `$DEFORMJAX_DCNV4_SRC`: the root of a DCNv4 checkout): DCNv4 has no
  pure-PyTorch path upstream. The reference `DCNv4` module runs with its CUDA op replaced by a
  grid_sample translation of the CUDA forward kernel (the one `tests/test_internimage.py` checks
  against): a PyTorch CPU baseline, not the official kernel's speed.

A model whose source is not given is skipped. Writes bench_internimage_cpu.json / .md under `--out` (runs/;
`--out experiments/results` refreshes the committed ones). The config (experiments/configs/bench_internimage.py)
holds every setting:

  DEFORMJAX_INTERNIMAGE_SRC=.../InternImage/classification DEFORMJAX_DCNV4_SRC=.../DCNv4 \\
    python -m experiments.bench_internimage --out experiments/results --config.batches=8,1 --config.torch_max_batch=1
  python -m experiments.bench_internimage --config=experiments/configs/bench_internimage.py:runlocal   # a quick look
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common import bench_main, benchmark_metadata, interleaved_ms, jax_call

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'bench_internimage.py'

T_KWARGS = dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], num_classes=1000, mlp_ratio=4.0,
                offset_scale=1.0, layer_scale=None, post_norm=False, drop_path_rate=0.0)


def _load_file(name: str, path: pathlib.Path) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def reference_internimage(src: pathlib.Path):
  """The reference InternImage class, its compiled extension (`DCNv3`) and version probe stubbed."""
  sys.path.insert(0, str(src))
  sys.modules.setdefault('DCNv3', types.ModuleType('DCNv3'))
  probe = types.ModuleType('pkg_resources')
  probe.get_distribution = lambda name: types.SimpleNamespace(version='1.0')
  sys.modules['pkg_resources'] = probe
  return _load_file('_reference_intern_image', src / 'models' / 'intern_image.py').InternImage


def reference_flash_internimage(src: pathlib.Path):
  """The reference FlashInternImage class over the reference DCNv4 module with `dcnv4_core_torch` as its op."""
  from references.torch_reference import dcnv4_package

  stubs = dcnv4_package()
  sys.modules.update(stubs)
  stubs['DCNv4'].DCNv4 = _load_file('DCNv4.modules.dcnv4', src / 'DCNv4_op' / 'DCNv4' / 'modules' / 'dcnv4.py').DCNv4
  return _load_file('_reference_flash_intern_image',
                    src / 'classification' / 'models' / 'flash_intern_image.py').FlashInternImage


def perturbed(model, seed=0, scale=0.02):
  """Parameters moved off their initialisation (offset heads included: sampling points off the grid)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if not name.endswith('num_batches_tracked'):
        p.add_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def case(name: str, src: pathlib.Path, reference, load, batches: list[int], size: int):
  """Build both sides of one model; per batch size, the timing callables and the logits agreement."""
  import torch
  extra = {'core_op': 'DCNv3_pytorch'} if name == 'InternImage-T' else {}
  torch.manual_seed(0)
  model_t = perturbed(reference(src)(**T_KWARGS, **extra))
  ours = load({k: v.detach().numpy() for k, v in model_t.state_dict().items()}, 't')
  graphdef, state = nnx.split(ours)
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  out = {'params': sum(p.numel() for p in model_t.parameters())}
  for batch in batches:
    x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    xt, xj = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))

    def torch_call(xt=xt):
      with torch.no_grad():
        return model_t(xt)

    out[batch] = {'ours': jax_call(fn, state, xj), 'torch': torch_call, 'x': (xt, xj)}
  return out, fn, state


def agreement(fn, state, torch_call, xj) -> float:
  ref = torch_call().numpy()
  return float(np.abs(np.asarray(fn(state, xj)) - ref).max() / np.abs(ref).max())


def time_model(cfg, name: str, src: str, reference, load, batches: list[int]) -> list[dict]:
  """The rows of one model: ours at every batch, the PyTorch side up to `torch_max_batch`, the logits' agreement."""
  c, fn, state = case(name, pathlib.Path(src), reference, load, batches, cfg.size)
  rows = []
  for batch in batches:
    timed = {'ours': c[batch]['ours']}
    if batch <= cfg.torch_max_batch:
      timed['torch'] = c[batch]['torch']
    ms = interleaved_ms(timed, rounds=cfg.rounds, per_round=1, warmup=1)
    rows.append({'model': name, 'batch': batch, 'params': c['params'], 'ours_ms': ms['ours'],
                 'torch_ms': ms.get('torch'), 'speedup': ms['torch'] / ms['ours'] if 'torch' in ms else None,
                 'max_rel_diff_logits': (agreement(fn, state, c[batch]['torch'], c[batch]['x'][1])
                                         if 'torch' in ms else None)})
    print(rows[-1], flush=True)
  return rows


def run(cfg) -> dict:
  """Both models where their sources are given (see the module's docstring)."""
  import torch

  from deformjax.convert import from_flash_internimage, from_internimage

  load_before = os.getloadavg()
  cases = {'InternImage-T': ('internimage_src', reference_internimage, from_internimage),
           'FlashInternImage-T': ('dcnv4_src', reference_flash_internimage, from_flash_internimage)}
  batches = [int(b) for item in cfg.batches for b in str(item).split(',') if b]
  rows = []
  for name, (field, reference, load) in cases.items():
    if not cfg[field]:
      print(f'{name}: no source given (config.{field}), skipped')
      continue
    rows += time_model(cfg, name, cfg[field], reference, load, batches)
  meta = benchmark_metadata(torch=torch.__version__)
  return {
      'benchmark': f'InternImage-T / FlashInternImage-T inference, {cfg.size}x{cfg.size}, float32', **meta,
      'device_name': meta['device'], 'torch_threads': torch.get_num_threads(),
      'method': f'median of {cfg.rounds} interleaved runs per side after 1 warm-up; ours jitted '
                '(jax.block_until_ready), PyTorch eager under torch.no_grad',
      'shapes': [f'batch {b} x 3 x {cfg.size} x {cfg.size} (NCHW, PyTorch); batch {b} x {cfg.size} x {cfg.size} x 3 '
                 '(NHWC, ours)' for b in batches],
      'shape': {'batches': batches, 'input_nchw_torch': ['batch', 3, cfg.size, cfg.size],
                'input_nhwc_ours': ['batch', cfg.size, cfg.size, 3]}, 'torch_max_batch': cfg.torch_max_batch,
      'dtype': 'float32', 'rounds': cfg.rounds, 'warmup': 1,
      'load_average_before': load_before, 'load_average_after': os.getloadavg(),
      'reference_cores': {'InternImage-T': "upstream DCNv3_pytorch (dcnv3_core_pytorch)",
                          'FlashInternImage-T': 'upstream DCNv4 module over a grid_sample translation of its CUDA '
                                                'forward kernel (no pure-PyTorch path upstream)'},
      'results': rows,
  }


def markdown(result: dict) -> str:
  """The page: the table, with the device, versions, load and method above it."""
  v = result['versions']
  lines = [
      f"# {result['benchmark']}",
      '',
      f"{result['device']}; jax {v['jax']}, flax {v['flax']}, torch {v['torch']} ({result['torch_threads']} threads); "
      f"{result['date']}. Shapes: {'; '.join(result['shapes'])}.",
      f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in result['load_average_before'])}; after: "
      f"{', '.join(f'{x:.2f}' for x in result['load_average_after'])} (a shared machine: the figures move with the "
      'load).',
      f"Median of {result['rounds']} interleaved runs per side after 1 warm-up; ours jitted (`jax.block_until_ready`), "
      'PyTorch eager under `torch.no_grad`.',
      '',
      '| model | params | batch | ours (ms) | PyTorch (ms) | PyTorch / ours | max rel. diff of logits |',
      '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for r in result['results']:
    torch_ms = '-' if r['torch_ms'] is None else f"{r['torch_ms']:.0f}"
    ratio = '-' if r['speedup'] is None else f"{r['speedup']:.1f}x"
    diff = '-' if r['max_rel_diff_logits'] is None else f"{r['max_rel_diff_logits']:.1e}"
    lines.append(f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['ours_ms']:.0f} | {torch_ms} | {ratio} | "
                 f'{diff} |')
  if any(r['torch_ms'] is None for r in result['results']):
    lines += ['', f"PyTorch timed at batches up to {result['torch_max_batch']} only (`torch_max_batch`): its CPU "
              'cores take minutes per forward at the larger batches on this machine.']
  lines += ['', 'PyTorch sides: InternImage-T runs its own pure-PyTorch DCNv3 core (`core_op=\'DCNv3_pytorch\'`); '
            'FlashInternImage-T has no pure-PyTorch path upstream, so its DCNv4 module runs over a grid_sample '
            'translation of the CUDA forward kernel (a CPU baseline, not the official kernel\'s speed).', '']
  return '\n'.join(lines)


def main(args=None) -> dict:
  """`python -m experiments.bench_internimage [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  return bench_main(args, 'experiments.bench_internimage', DEFAULT_CONFIG, run, markdown,
                    lambda cfg: 'bench_internimage_cpu')


if __name__ == '__main__':
  main()
