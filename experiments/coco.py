"""Study 4: COCO 9-class multi-label, regular vs deformable (per-class accuracy, mAP).

  python -m experiments.coco --data_dir ~/tensorflow_datasets --seeds=0,1,2

Writes experiments/results/coco9.json / .md. Needs COCO 2017 prepared by TFDS
in --data_dir (or --config.data_dir); without it, it stops with one line saying how to prepare it.
The config is a training config (experiments/configs/coco9.py): any of its
fields can be overridden as `--config.FIELD=VALUE`.
"""

from __future__ import annotations

import copy
import pathlib

import jax
import numpy as np
from absl import flags

from deformjax.train.cli import command_line, fail, run_or_exit
from experiments.common import parse, pm, run_metadata, study_flags, write_results

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'coco9.py'
VARIANTS = (('regular', 'none'), ('deformable', '2'))


def run(base, seeds, echo=print) -> dict:
  from deformjax.data import get_spec
  from deformjax.train import train

  runs = []
  for variant, deformable in VARIANTS:
    for seed in seeds:
      cfg = copy.deepcopy(base)
      cfg.unlock()
      cfg.seed, cfg.deformable = seed, deformable
      ev = train(cfg, echo=lambda *_: None)['eval']['baseline']
      runs.append({'variant': variant, 'seed': seed, **{k: ev[k] for k in ('accuracy', 'mean_accuracy', 'mAP')},
                   'per_class_accuracy': ev['per_class_accuracy'], 'average_precision': ev['average_precision']})
      echo(f"{variant:>10s} seed {seed}: mean accuracy {100 * ev['mean_accuracy']:.2f}%, mAP {100 * ev['mAP']:.2f}%")
  return {'name': 'coco9', 'dataset': base.dataset, 'classes': list(get_spec(base.dataset).class_names),
          'config': base.to_dict(), **run_metadata(), 'runs': runs}


def table(result) -> str:
  classes = result['classes']
  lines = ['| model | mean accuracy | mAP | ' + ' | '.join(f'AP {c}' for c in classes) + ' |',
           '|---|---|---|' + '---|' * len(classes)]
  for variant, _ in VARIANTS:
    rs = [r for r in result['runs'] if r['variant'] == variant]
    lines.append(f"| {variant} | {pm([r['mean_accuracy'] for r in rs])} | {pm([r['mAP'] for r in rs])} | "
                 + ' | '.join(f"{100 * np.nanmean([r['average_precision'][c] for r in rs]):.1f}" for c in classes)
                 + ' |')
  return '\n'.join(lines)


def main(args=None) -> dict:
  """`python -m experiments.coco [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--seeds=0,1,2] [--out DIR]`."""
  argv = command_line(args, 'experiments.coco')
  fv, config, out_flag = study_flags(argv, DEFAULT_CONFIG)
  seeds = flags.DEFINE_list('seeds', ['0', '1', '2'], 'the seeds each variant trains with', flag_values=fv)
  data_dir = flags.DEFINE_string('data_dir', None, 'TFDS data directory holding coco/2017 (the same as '
                                 '--config.data_dir=DIR)', flag_values=fv)
  base = parse(fv, argv, config)
  try:
    seed_list = [int(s) for s in seeds.value]
  except ValueError:
    fail(f'--seeds: integers separated by commas, got {",".join(seeds.value)!r}')
  out = pathlib.Path(out_flag.value)
  base.progress = False
  if data_dir.value:
    base.data_dir = data_dir.value
  result = run_or_exit(run, base, seed_list)
  name = 'coco9' if base.dataset == 'coco9' else f'multilabel_{base.dataset}'
  md = f"# {name}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}.\n\n{table(result)}\n"
  write_results(name, result, md, out)
  print('\n' + table(result))
  return result


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
