"""Study 3: training cost of deformable layers.

Time per step and per epoch of the same classifier with 0 (regular), 1, 2 and 3
deformable layers (and the modulated variant), trained side by side in one
process, each setting repeated and interleaved so machine load hits all alike.
Writes experiments/results/training_cost_<dataset>_<platform>.json / .md / .png.

  python -m experiments.training_cost                      # digits, CPU: ~3 minutes
  python -m experiments.training_cost --dataset=cifar10    # the original study saw 2.3x (torchvision, CIFAR-10)
"""

from __future__ import annotations

import collections
import pathlib

import jax
import numpy as np
from absl import flags

from deformjax.train.cli import command_line, run_or_exit
from experiments.common import parse, run_metadata, study_flags, write_results

Args = collections.namedtuple('Args', 'dataset steps repeats batch_size out')
SETTINGS = (('regular', 'none', False), ('deformable x1', '1', False), ('deformable x2', '2', False),
            ('deformable x3', '3', False), ('modulated x2', '2', True))


def main(args=None) -> dict:
  """`python -m experiments.training_cost [--dataset=digits] [--steps=60] [--repeats=2] [--batch_size=64]`."""
  argv = command_line(args, 'experiments.training_cost')
  fv, _, out_flag = study_flags(argv)
  dataset = flags.DEFINE_string('dataset', 'digits', 'the data the classifier trains on (cifar10: CifarNet)',
                                flag_values=fv)
  steps = flags.DEFINE_integer('steps', 60, 'timed steps per run (after one compiling step)', lower_bound=1,
                               flag_values=fv)
  repeats = flags.DEFINE_integer('repeats', 2, 'interleaved repeats of every setting', lower_bound=1, flag_values=fv)
  batch_size = flags.DEFINE_integer('batch_size', 64, 'global batch size', lower_bound=1, flag_values=fv)
  parse(fv, argv)
  args = Args(dataset.value, steps.value, repeats.value, batch_size.value, pathlib.Path(out_flag.value))
  from deformjax.train import base_config, train

  settings = SETTINGS if args.dataset != 'cifar10' else (
      ('regular', 'none', False), ('deformable x1', '1', False), ('deformable x2', '2', False))
  times = {name: [] for name, _, _ in settings}
  steps_per_epoch = None

  def config(deformable, modulated, steps, seed):
    cfg = base_config()
    cfg.dataset = args.dataset
    cfg.model = 'cifarnet' if args.dataset == 'cifar10' else 'conv5'
    cfg.deformable, cfg.modulated = deformable, modulated
    cfg.steps, cfg.batch_size, cfg.progress, cfg.seed = steps + 1, args.batch_size, False, seed
    cfg.eval_batch_size = 512
    return cfg

  # bench_train's method: every setting runs once untimed first, so the first
  # setting timed does not absorb the process's start-up costs.
  for _, deformable, modulated in settings:
    run_or_exit(train, config(deformable, modulated, 2, 0), echo=lambda *_: None)
  for rep in range(args.repeats):
    for name, deformable, modulated in settings:
      summary = run_or_exit(train, config(deformable, modulated, args.steps, rep), echo=lambda *_: None)
      times[name].append(summary['seconds_per_step'])
      steps_per_epoch = summary['steps_per_epoch']
      print(f"repeat {rep} {name:>14s}: {1e3 * summary['seconds_per_step']:.1f} ms/step", flush=True)
  base = float(np.median(times['regular']))
  rows = [{'setting': n, 'ms_per_step': 1e3 * float(np.median(t)), 'seconds_per_epoch': float(np.median(t)) * steps_per_epoch,
           'ratio_vs_regular': float(np.median(t)) / base, 'all_ms_per_step': [1e3 * x for x in t]}
          for n, t in times.items()]
  result = {'name': 'training_cost', 'dataset': args.dataset, 'batch_size': args.batch_size, 'steps': args.steps,
            'steps_per_epoch': steps_per_epoch, **run_metadata(), 'rows': rows,
            'method': f'median over {args.repeats} interleaved runs (after one untimed run of every setting) of '
                      'the wall time per step after the compiling step (data feeding and augmentation included, '
                      'evaluation excluded)'}
  lines = [f"| setting ({args.dataset}, batch {args.batch_size}) | ms / step | s / epoch | vs regular |",
           '|---|---|---|---|']
  lines += [f"| {r['setting']} | {r['ms_per_step']:.1f} | {r['seconds_per_epoch']:.2f} | {r['ratio_vs_regular']:.2f}x |"
            for r in rows]
  table = '\n'.join(lines)
  name = f"training_cost_{args.dataset}_{jax.devices()[0].platform}"
  md = (f"# Training cost ({args.dataset})\n\nDevice: {result['device']}; {result['versions']}; {result['date']}. "
        f"{result['method']}.\n\n{table}\n")
  write_results(name, result, md, args.out)
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.2))
  ax.bar([r['setting'] for r in rows], [r['ms_per_step'] for r in rows], color='tab:orange')
  ax.set_ylabel('ms per train step')
  ax.set_title(f"{args.dataset}: cost of deformable layers ({result['device'].split(',')[0]})")
  fig.tight_layout()
  fig.savefig(args.out / f'{name}.png', dpi=120)
  plt.close(fig)
  print('\n' + table)
  return result


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
