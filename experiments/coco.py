"""Study 4: COCO 9-class multi-label, regular vs deformable (per-class accuracy, mAP).

  python -m experiments.coco --data_dir ~/tensorflow_datasets --seeds 0 1 2

Writes experiments/results/coco9.json / .md. Needs COCO 2017 prepared by TFDS
in --data_dir; without it, it stops with one line saying how to prepare it.
"""

from __future__ import annotations

import argparse
import copy
import pathlib

import jax
import numpy as np

from experiments.common import OUT_HELP, RUNS, load_config, pm, run_metadata, run_or_exit, write_results

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


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=str(DEFAULT_CONFIG))
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--dataset', default=None, help='override the config dataset (tests use a multi-label stand-in)')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--out', type=pathlib.Path, default=RUNS, help=OUT_HELP)
  args = parser.parse_args(argv)
  base = load_config(args.config)
  base.progress = False
  if args.data_dir:
    base.data_dir = args.data_dir
  if args.dataset:
    base.dataset = args.dataset
  result = run_or_exit(run, base, args.seeds)
  name = 'coco9' if base.dataset == 'coco9' else f'multilabel_{base.dataset}'
  md = f"# {name}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}.\n\n{table(result)}\n"
  write_results(name, result, md, args.out)
  print('\n' + table(result))
  return result


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
