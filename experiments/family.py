"""The deformable family's robustness study: regular, DCNv1, DCNv2, DCNv3 and DCNv4 convs.

The robustness study's protocol (`experiments.robustness`) with five variants
of the 5-conv classifier: each (variant, condition) trains all seeds together
under the condition's random affine transform and tests on the test split under
the same kind of transform (fixed test seed). Writes `<name>.json`, `.md` (the
accuracy table, parameter counts, training time per step) and `.png` under `--out`.

  python -m experiments.family
  python -m experiments.family --config experiments/configs/family.py:runlocal
  python -m experiments.family --out experiments/results --config.seeds=0,1,2
"""

from __future__ import annotations

import copy
import pathlib
import time

import jax

from deformjax.train.cli import command_line, run_or_exit
from experiments.common import StudyView, mean_std, parse, pm, run_metadata, seed_groups, study_flags, write_results

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'family.py'


def parameter_counts(cfg) -> dict[str, int]:
  """Trainable parameters of each variant's model (the offset / mask heads included)."""
  from flax import nnx

  from deformjax.data.sources import get_spec
  from deformjax.models import build_model

  spec = get_spec(cfg.train.dataset)
  counts = {}
  for variant in cfg.variant_order:
    v = cfg.variants[variant]
    model = nnx.eval_shape(lambda v=v: build_model(
        cfg.train.model, in_features=spec.image_shape[-1], num_classes=spec.num_classes,
        image_size=spec.image_shape[0], deformable=v.deformable, modulated=False, conv=v.conv, rngs=nnx.Rngs(0)))
    counts[variant] = int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
  return counts


def run(cfg, echo=print, live=None) -> dict:
  """Trains every (condition, variant) with all seeds together, under one progress view; each variant
  compiles once for the whole study (seeds and transforms are data to the compiled step)."""
  from deformjax.data.sources import get_spec, load_source
  from deformjax.train import train

  spec = get_spec(cfg.train.dataset)
  sources = (load_source(cfg.train.dataset, spec.splits[0], cfg.train.data_dir),
             load_source(cfg.train.dataset, spec.splits[1], cfg.train.data_dir))
  steps = cfg.train.steps if cfg.train.steps > 0 else cfg.train.epochs * (len(sources[0]) // cfg.train.batch_size)
  groups = seed_groups(cfg.seeds)
  settings = [(cond, variant) for cond in cfg.condition_order for variant in cfg.variant_order]
  runs = []
  start = time.time()
  with StudyView(f'{cfg.name}: test accuracy (%), mean ± std over {len(cfg.seeds)} seeds', cfg.variant_order,
                 cfg.condition_order, steps * len(cfg.seeds) * len(settings), live=live, echo=echo) as view:
    for cond, variant in settings:
      aug = cfg.conditions[cond]
      t0 = time.time()
      setting_runs = []
      for first, count in groups:
        tc = copy.deepcopy(cfg.train)
        tc.unlock()
        tc.seed, tc.num_seeds = first, count
        tc.deformable = cfg.variants[variant].deformable
        tc.conv = cfg.variants[variant].conv
        tc.modulated = False
        tc.train_augment = aug
        tc.eval_sets = {cond: aug}
        summary = train(tc, echo=lambda *_: None, sources=sources, on_step=lambda n=count: view.advance(n))
        evals = summary['eval'] if count > 1 else [summary['eval']]
        for seed, ev in zip(summary['seeds'], evals):
          # seconds_per_step covers all `count` seeds of one step: per seed, the share of it.
          setting_runs.append({'condition': cond, 'variant': variant, 'seed': seed,
                               'accuracy': ev[cond]['accuracy'], 'seeds_together': count,
                               'seconds_per_step': summary['seconds_per_step'] / count, 'steps': summary['steps']})
      wall = time.time() - t0
      for r in setting_runs:
        r['setting_wall_seconds'] = wall
      runs += setting_runs
      accs = [r['accuracy'] for r in setting_runs]
      view.fill(variant, cond, pm(accs), f'{cond:>20s} {variant:>8s}: {pm(accs)} % over seeds '
                f"{', '.join(str(r['seed']) for r in setting_runs)} "
                f"({1e3 * setting_runs[0]['seconds_per_step']:.1f} ms per seed-step, {wall:.0f} s)")
  return {'name': cfg.name, 'config': cfg.to_dict(), **run_metadata(), 'runs': runs,
          'parameters': parameter_counts(cfg), 'wall_seconds': time.time() - start}


def table(result: dict) -> str:
  """The markdown table: accuracy per variant and condition (mean ± std over seeds), parameters, step time."""
  cfg = result['config']
  conds = list(cfg['condition_order'])
  lines = [f"| conv ({cfg['train']['dataset']}, {len(cfg['seeds'])} seeds) | " + ' | '.join(conds)
           + ' | parameters | ms / step / seed |', '|---|' + '---|' * (len(conds) + 2)]
  regular_time = None
  for variant in cfg['variant_order']:
    cells = [pm([r['accuracy'] for r in result['runs'] if r['variant'] == variant and r['condition'] == c])
             for c in conds]
    t = mean_std([r['seconds_per_step'] for r in result['runs'] if r['variant'] == variant])[0]
    regular_time = t if variant == 'regular' else regular_time
    ratio = f' ({t / regular_time:.2f}x)' if regular_time and variant != 'regular' else ''
    lines.append(f'| {variant} | ' + ' | '.join(cells) + f" | {result['parameters'][variant]:,} | "
                 f'{1e3 * t:.1f}{ratio} |')
  lines += ['', 'Accuracy in %. Step time: one training step of one seed (seeds train together on the same '
            'device), mean over the conditions; in brackets, relative to the regular net.']
  return '\n'.join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  """Grouped bars: accuracy per condition, one bar (mean ± std over seeds) per variant."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  cfg = result['config']
  conds, variants = list(cfg['condition_order']), list(cfg['variant_order'])
  fig, ax = plt.subplots(figsize=(2.2 * len(conds) + 2, 3.8))
  width = 0.8 / len(variants)
  for i, v in enumerate(variants):
    stats = [mean_std([r['accuracy'] for r in result['runs'] if r['variant'] == v and r['condition'] == c])
             for c in conds]
    ax.bar(np.arange(len(conds)) + i * width, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats],
           capsize=3, label=v)
  ax.set_xticks(np.arange(len(conds)) + width * (len(variants) - 1) / 2, conds)
  lo = min(100 * r['accuracy'] for r in result['runs'])
  ax.set_ylim(max(0, lo - 10), 100)
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f"{cfg['train']['dataset']}: the deformable family, mean ± std over {len(cfg['seeds'])} seeds")
  ax.legend(loc='lower left', ncol=len(variants))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(args=None) -> dict:
  """`python -m experiments.family [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  argv = command_line(args, 'experiments.family')
  fv, config, out_flag = study_flags(argv, DEFAULT_CONFIG)
  cfg = parse(fv, argv, config)
  out = pathlib.Path(out_flag.value)
  result = run_or_exit(run, cfg)
  md = (f"# {cfg.name}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}. "
        f"Wall time of the whole study: {result['wall_seconds']:.0f} s.\n\n{table(result)}\n")
  write_results(cfg.name, result, md, out)
  plot(result, out / f'{cfg.name}.png')
  print('\n' + table(result))
  print(f"\n{len(result['runs'])} runs in {result['wall_seconds']:.0f} s on {result['device']}")
  print(f'wrote {out / cfg.name}.json, .md, .png')
  return result


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
