"""Study 2: scale robustness and effective dilation.

Trains regular and deformable (last three convs) classifiers at scale 1 and
tests them with the test digits scaled by 0.5 ... 1.5. For the trained
deformable models it measures the effective dilation (mean distance between
adjacent sampling taps, DCN paper) of each deformable layer on the digit, as a
function of scale, and draws the learned sampling locations over a test digit.
Writes experiments/results/<name>.json / .md and three PNGs.

  python -m experiments.scale
"""

from __future__ import annotations

import copy
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.train.cli import command_line, run_or_exit
from experiments.common import parse, pm, run_metadata, study_flags, write_results

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'scale.py'


def trained_model(summary, tc):
  from deformjax.data import get_spec
  from deformjax.models import build_model

  spec = get_spec(tc.dataset)
  model = build_model(tc.model, in_features=spec.image_shape[-1], num_classes=spec.num_classes,
                      image_size=spec.image_shape[0], deformable=tc.deformable, modulated=tc.modulated,
                      rngs=nnx.Rngs(0))
  nnx.update(model, jax.device_get(summary['params']))
  return model


def dilation_vs_scale(model, images, scales) -> dict:
  """Effective dilation per deformable layer, on the digit, at each scale."""
  from deformjax.data import transform
  from deformjax.nn import DeformConv
  from deformjax.train.steps import normalise
  from deformjax.viz import effective_dilation, layer_fields

  convs = [c for c in model.convs if isinstance(c, DeformConv)]
  out = {f'conv{len(model.convs) - len(convs) + i + 1}': [] for i in range(len(convs))}
  for s in scales:
    scaled = transform(jnp.asarray(images), scale=s)
    fields = layer_fields(model, normalise(scaled), convs=convs)
    # Output positions "on the digit": the 4x4 input block under a 7x7 feature pixel has ink.
    ink = np.asarray(scaled)[..., 0].reshape(len(images), 7, 4, 7, 4).mean((2, 4)) > 0.1
    for name, f in zip(out, fields):
      out[name].append(float(np.mean([effective_dilation(f, i, ink[i]) for i in range(len(images))])))
  return out


def run(cfg, out_dir: pathlib.Path, echo=print) -> dict:
  from deformjax.data import load_source, transform
  from deformjax.train import train
  from deformjax.train.steps import normalise
  from deformjax.viz import draw_sampling_locations

  start = time.time()
  runs, dilations = [], []
  test = load_source(cfg.train.dataset, 'test' if cfg.train.dataset != 'coco9' else 'validation')
  probe = np.stack([test[i]['image'] for i in range(cfg.dilation_images)]).astype(np.float32)
  if probe.max() > 1.0:
    probe = probe / 255.0
  for variant in cfg.variant_order:
    for seed in cfg.seeds:
      tc = copy.deepcopy(cfg.train)
      tc.unlock()
      tc.seed, tc.deformable = seed, cfg.variants[variant]
      summary = train(tc, echo=lambda *_: None)
      accs = [summary['eval'][f'scale_{int(round(100 * s)):03d}']['accuracy'] for s in cfg.scales]
      runs.append({'variant': variant, 'seed': seed, 'accuracy': dict(zip([f'{s:.1f}' for s in cfg.scales], accs)),
                   'mean_over_scales': float(np.mean(accs))})
      echo(f'{variant:>10s} seed {seed}: mean over scales {100 * np.mean(accs):.2f}%  '
           + ' '.join(f'{s:.1f}:{100 * a:.1f}' for s, a in zip(cfg.scales, accs)))
      if variant == 'deformable':
        model = trained_model(summary, tc)
        dilations.append(dilation_vs_scale(model, probe, cfg.scales))
        if seed == cfg.seeds[0]:
          digit = int(np.argmax(np.asarray(test.labels[:cfg.dilation_images]) == 7)) if hasattr(test, 'labels') else 0
          for s in (0.6, 1.0, 1.4):
            img = normalise(transform(jnp.asarray(probe[digit:digit + 1]), scale=s))[0]
            draw_sampling_locations(model, np.asarray(img), out_dir / f'{cfg.name}_sampling_scale{s:.1f}.png',
                                    title=f'learned sampling locations, digit scaled by {s:.1f}')
  result = {'name': cfg.name, 'config': cfg.to_dict(), **run_metadata(), 'runs': runs,
            'effective_dilation': {'scales': list(cfg.scales), 'per_seed': dilations},
            'wall_seconds': time.time() - start}
  return result


def tables(result) -> str:
  cfg = result['config']
  scales = [f'{s:.1f}' for s in cfg['scales']]
  lines = [f"| model ({cfg['train']['dataset']}, {len(cfg['seeds'])} seeds) | mean over scales | "
           + ' | '.join(scales) + ' |', '|---|---|' + '---|' * len(scales)]
  for v in cfg['variant_order']:
    rs = [r for r in result['runs'] if r['variant'] == v]
    lines.append(f'| {v} | {pm([r["mean_over_scales"] for r in rs])} | '
                 + ' | '.join(pm([r['accuracy'][s] for r in rs], digits=1) for s in scales) + ' |')
  for v in cfg['variant_order']:
    lines.append(f"| original study, {v} (MNIST, 1 run) | {cfg['reference'][v]:.2f} |" + ' |' * len(scales))
  dil = result['effective_dilation']['per_seed']
  if dil:
    lines += ['', '| effective dilation (deformable, on the digit) | ' + ' | '.join(scales) + ' |',
              '|---|' + '---|' * len(scales)]
    for layer in dil[0]:
      vals = np.asarray([d[layer] for d in dil])
      lines.append(f'| {layer} | ' + ' | '.join(f'{m:.3f} ± {s:.3f}' if len(vals) > 1 else f'{m:.3f}'
                                             for m, s in zip(vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1
                                                             else vals.mean(0))) + ' |')
    lines.append('| regular conv | ' + ' | '.join('1.000' for _ in scales) + ' |')
  return '\n'.join(lines)


def main(args=None) -> dict:
  """`python -m experiments.scale [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  argv = command_line(args, 'experiments.scale')
  fv, config, out_flag = study_flags(argv, DEFAULT_CONFIG)
  cfg = parse(fv, argv, config)
  out = pathlib.Path(out_flag.value)
  out.mkdir(parents=True, exist_ok=True)
  from deformjax.viz import line_plot

  result = run_or_exit(run, cfg, out)
  scales = list(cfg.scales)
  series, errors = {}, {}
  for v in cfg.variant_order:
    per = np.asarray([[r['accuracy'][f'{s:.1f}'] for s in scales] for r in result['runs'] if r['variant'] == v])
    series[v] = 100 * per.mean(0)
    errors[v] = 100 * (per.std(0, ddof=1) if len(per) > 1 else np.zeros(len(scales)))
  line_plot(scales, series, out / f'{cfg.name}_accuracy.png', errors=errors, xlabel='test-time scale',
            ylabel='test accuracy (%)', title=f'{cfg.train.dataset}: trained at scale 1')
  dil = result['effective_dilation']['per_seed']
  if dil:
    line_plot(scales, {k: np.mean([d[k] for d in dil], 0) for k in dil[0]} | {'regular conv': np.ones(len(scales))},
              out / f'{cfg.name}_dilation.png', xlabel='digit scale', ylabel='effective dilation',
              title='mean distance between adjacent taps')
  md = (f"# {cfg.name}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}. "
        f"Wall time of the whole study: {result['wall_seconds']:.0f} s.\n\n{tables(result)}\n")
  write_results(cfg.name, result, md, out)
  print('\n' + tables(result))
  return result


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
