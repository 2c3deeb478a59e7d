"""Study 1: geometric robustness of regular vs deformable convolution.

Each (variant, condition, seed) trains a classifier on training images under
the condition's random affine transform and tests it on the test split under
the same kind of transform (fixed test seed), like the original study. Writes
experiments/results/<name>.json / .md / .png and prints the table.

  python -m experiments.robustness
  python -m experiments.robustness --config experiments/configs/robustness.py:cifar10 --config.seeds=0,1,2
"""

from __future__ import annotations

import copy
import pathlib

import jax

from experiments.common import bar_plot, mean_std, pm, study_main, train_study

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'robustness.py'


def run(cfg, echo=print, live=None) -> dict:
  """Trains every (condition, variant) with all seeds together (`num_seeds`), under one progress view
  (`experiments.common.train_study`); a variant is the train config's `deformable` setting."""

  def variant_config(variant: str):
    tc = copy.deepcopy(cfg.train)
    tc.unlock()
    tc.deformable = cfg.variants[variant]
    return tc

  return train_study(cfg, variant_config, echo=echo, live=live)


def table(result: dict) -> str:
  cfg = result['config']
  conds = list(cfg['condition_order'])
  lines = [f"| model ({cfg['train']['dataset']}, {len(cfg['seeds'])} seeds) | " + ' | '.join(conds) + ' |',
           '|---|' + '---|' * len(conds)]
  for variant in cfg['variant_order']:
    cells = [pm([r['accuracy'] for r in result['runs'] if r['variant'] == variant and r['condition'] == c])
             for c in conds]
    lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  ref = cfg['reference']
  for variant in cfg['variant_order']:
    cells = [f"{ref[variant][c]:.2f}" if c in ref.get(variant, {}) else '-' for c in conds]
    lines.append(f"| original study, {variant} ({cfg['reference_dataset']}, 1 run) | " + ' | '.join(cells) + ' |')
  times = {v: mean_std([r['seconds_per_step'] for r in result['runs'] if r['variant'] == v])[0]
           for v in cfg['variant_order']}
  lines += ['', 'Training time per step and seed (mean over settings; seeds train together, same device): '
            + ', '.join(f'{v} {1e3 * t:.1f} ms' for v, t in times.items())
            + (f"; deformable / regular = {times['deformable'] / times['regular']:.2f}x"
               if 'deformable' in times and 'regular' in times else '')]
  return '\n'.join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  cfg = result['config']
  bar_plot(result, path, f"{cfg['train']['dataset']}: regular vs deformable, mean ± std over {len(cfg['seeds'])} seeds")


def main(args=None) -> dict:
  """`python -m experiments.robustness [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  return study_main(args, 'experiments.robustness', DEFAULT_CONFIG, run, table, plot)


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
