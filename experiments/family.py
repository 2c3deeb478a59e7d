"""The deformable family's robustness study: regular, DCNv1, DCNv2, DCNv3 and DCNv4 convs, and InternImage.

The robustness study's protocol (`experiments.robustness`) with five variants
of the 5-conv classifier and the micro InternImage (`config.variants`: each
names its model and preset, deformable convs and conv; an unset field is the
train config's): each (variant, condition) trains all seeds together
under the condition's random affine transform and tests on the test split under
the same kind of transform (fixed test seed). Writes `<name>.json`, `.md` (the
accuracy table, parameter counts, training time per step) and `.png` under `--out`.

  python -m experiments.family
  python -m experiments.family --config experiments/configs/family.py:runlocal
  python -m experiments.family --out experiments/results --config.seeds=0,1,2
"""

from __future__ import annotations

import copy
import functools
import pathlib

import jax

from experiments.common import bar_plot, mean_std, pm, study_main, train_study

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'family.py'


def variant_config(cfg, variant: str):
  """The train config of `variant`: `cfg.train` with the variant's model, preset, deformable convs and conv.

  A field the variant leaves unset keeps the train config's value.
  """
  v = cfg.variants[variant]
  tc = copy.deepcopy(cfg.train)
  tc.unlock()
  for field in ('model', 'preset', 'deformable', 'conv'):
    tc[field] = v.get(field, tc[field])
  tc.modulated = False  # DCNv2 is a conv of its own ('dcnv2'), not a switch on the others
  return tc


def parameter_counts(cfg) -> dict[str, int]:
  """Trainable parameters of each variant's model (the offset / mask heads included)."""
  from flax import nnx

  from deformjax.data.sources import get_spec
  from deformjax.train.loop import model_factory

  spec = get_spec(cfg.train.dataset)
  counts = {}
  for variant in cfg.variant_order:
    model = nnx.eval_shape(functools.partial(model_factory(variant_config(cfg, variant), spec), 0))
    counts[variant] = int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
  return counts


def run(cfg, echo=print, live=None) -> dict:
  """Trains every (condition, variant) with all seeds together, under one progress view
  (`experiments.common.train_study`), and counts each variant's parameters."""
  result = train_study(cfg, functools.partial(variant_config, cfg), echo=echo, live=live)
  return {**result, 'parameters': parameter_counts(cfg)}


def table(result: dict) -> str:
  """The markdown table: accuracy per variant and condition (mean ± std over seeds), parameters, step time."""
  cfg = result['config']
  conds = list(cfg['condition_order'])
  lines = [f"| variant ({cfg['train']['dataset']}, {len(cfg['seeds'])} seeds) | " + ' | '.join(conds)
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
  own = [v for v in cfg['variant_order'] if 'model' in cfg['variants'][v]]
  if own:
    lines[-1] += (f" Model: {cfg['train']['model']!r}, except " + '; '.join(
        f"{v}: {cfg['variants'][v]['model']!r} at preset {cfg['variants'][v].get('preset', cfg['train']['preset'])!r}"
        for v in own) + '.')
  return '\n'.join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  """Grouped bars: accuracy per condition, one bar (mean ± std over seeds) per variant, the legend beside them."""
  cfg = result['config']
  bar_plot(result, path, f"{cfg['train']['dataset']}: the deformable family, mean ± std over {len(cfg['seeds'])} seeds",
           inches_per_condition=2.2, height=3.8, legend_outside=True)


def main(args=None) -> dict:
  """`python -m experiments.family [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  return study_main(args, 'experiments.family', DEFAULT_CONFIG, run, table, plot)


if __name__ == '__main__':
  jax.config.update('jax_numpy_dtype_promotion', 'standard')
  main()
