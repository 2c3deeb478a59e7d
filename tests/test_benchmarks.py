"""The benchmarks run end to end at their `runlocal` configs, write their files through the one results writer, and
report what they measured.

Each is called through its `main(args)` (the studies' command line: `--config FILE[:ARG]`, `--config.FIELD=VALUE`,
`--out DIR`) in this process. Timing figures are checked against the measurements they are computed from, never
against the clock.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import jax
import pytest

pytest.importorskip('ml_collections')

from experiments import bench_ops, common  # noqa: E402


def runlocal(module, *overrides: str) -> list[str]:
  return [f'--config={module.DEFAULT_CONFIG}:runlocal', *overrides]


def test_bench_ops_writes_json_and_markdown_and_times_torchvision_in_the_same_rounds(tmp_path, monkeypatch):
  """One run of the benchmark: the ratios are the measured times' ratios, the JSON holds the rows and the markdown
  their table under the device, versions and shapes; the torchvision columns come from the interleaved timing like
  every other case (a stand-in plays torchvision's part, so the test runs without torch)."""
  calls = []
  fake = lambda name: lambda: calls.append(name)
  monkeypatch.setattr(bench_ops, 'torchvision_cases', lambda *a: (
      {'device': 'cpu', 'torch': 'x', 'torchvision': 'y'}, {'tv_fwd': fake('f'), 'tv_fwd_bwd': fake('fb')}))
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(runlocal(bench_ops, '--config.repeats=4', '--config.rounds=2', '--config.tag=t',
                                     f'--out={tmp_path}'))
  row = result['rows'][0]
  assert min(row['ours_fwd_ms'], row['conv_fwd_ms'], row['ours_fwd_bwd_ms'], row['conv_fwd_bwd_ms']) > 0
  assert row['fwd_ratio_vs_conv'] == pytest.approx(row['ours_fwd_ms'] / row['conv_fwd_ms'])
  assert row['fwd_bwd_ratio_vs_conv'] == pytest.approx(row['ours_fwd_bwd_ms'] / row['conv_fwd_bwd_ms'])
  saved = json.loads((tmp_path / 'bench_ops_t.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(result['rows']))
  assert saved['shapes'] == ['N=2 6x6 4->4 3x3'] and saved['device'] == common.device_name()
  md = (tmp_path / 'bench_ops_t.md').read_text()
  assert f"| 2 | 6x6 | 4->4 | float32 | {row['conv_fwd_ms']:.2f} | {row['ours_fwd_ms']:.2f} | " \
         f"{row['fwd_ratio_vs_conv']:.2f}x |" in md
  assert f"Device: {saved['device']}. Versions: python " in md and 'Shapes: N=2 6x6 4->4 3x3.' in md
  assert calls.count('f') == calls.count('fb') == 2 + 4  # warm-up, then 2 rounds x 2 runs
  tv = row['torchvision']
  assert row['fwd_bwd_ratio_vs_torchvision'] == pytest.approx(row['ours_fwd_bwd_ms'] / tv['fwd_bwd_ms'])
  assert row['fwd_ratio_vs_torchvision'] == pytest.approx(row['ours_fwd_ms'] / tv['fwd_ms'])
  assert 'not importable' not in md


def test_bench_ops_names_a_bad_shape_and_a_bad_config_argument(capsys):
  with pytest.raises(SystemExit) as exit_:
    bench_ops.main(runlocal(bench_ops, '--config.shapes=2,6,4'))
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith('error: --config.shapes: (N, HW, C) triples of positive ints')
  with pytest.raises(SystemExit) as exit_:
    bench_ops.main([f'--config={bench_ops.DEFAULT_CONFIG}:runlocal,wobbly'])
  assert exit_.value.code == 2
  assert 'unknown config argument wobbly; choose from family, runlocal' in capsys.readouterr().err


def test_the_results_writer_refuses_a_result_that_does_not_say_where_it_ran(tmp_path):
  result = {'benchmark': 'b', 'date': 'd', 'versions': {}, 'method': 'm', 'shapes': []}
  with pytest.raises(ValueError, match=r"write_benchmark\('b'\): the result has no device; every benchmark result "
                                       r'holds benchmark, date, device, versions, method, shapes'):
    common.write_benchmark('b', result, '# b\n', tmp_path)
  assert not list(tmp_path.iterdir())
  common.write_benchmark('b', {**result, 'device': 'cpu'}, '# b\n', tmp_path)
  assert json.loads((tmp_path / 'b.json').read_text())['device'] == 'cpu' and (tmp_path / 'b.md').read_text() == '# b\n'


BENCHMARKS = sorted(p.stem for p in (pathlib.Path(common.__file__).parent).glob('bench_*.py'))


def test_the_benchmarks_are_found():
  assert {'bench_ops', 'bench_train', 'bench_onnx', 'bench_internimage'} <= set(BENCHMARKS)


@pytest.mark.parametrize('name', BENCHMARKS)
def test_every_benchmark_has_a_config_with_a_runlocal_form(name):
  """Each benchmark (experiments/bench_*.py) has a config file, experiments/configs/<name>.py, that loads with and
  without `runlocal`, and the runlocal form changes something (it is what the smoke tests run)."""
  import importlib.util

  path = pathlib.Path(common.__file__).parent / 'configs' / f'{name}.py'
  assert path.is_file(), f'experiments/{name}.py has no config file experiments/configs/{name}.py'
  spec = importlib.util.spec_from_file_location(f'_{name}_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  full, small = module.get_config(), module.get_config('runlocal')
  assert full.keys() == small.keys() and full.to_dict() != small.to_dict()
  with pytest.raises(ValueError, match='unknown config argument'):
    module.get_config('wobbly')


@pytest.mark.slow
def test_bench_ops_times_the_deterministic_backward(tmp_path):
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(runlocal(bench_ops, '--config.tag=t', '--config.deterministic_gradients=True',
                                     '--config.precision=highest', '--config.dtype=bfloat16', f'--out={tmp_path}'))
  row = result['rows'][0]
  assert row['det_fwd_bwd_ms'] > 0
  assert row['det_fwd_bwd_ratio_vs_default'] == pytest.approx(row['det_fwd_bwd_ms'] / row['ours_fwd_bwd_ms'])
  assert row['columns_bytes'] == 2 * 6 * 6 * 9 * 4 * 4
  assert result['precision'] == 'highest'
  assert 'deterministic fwd+bwd (ms)' in (tmp_path / 'bench_ops_t.md').read_text()


@pytest.mark.slow
def test_bench_ops_family_runs_every_op_at_its_runlocal_shapes(tmp_path):
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main([f'--config={bench_ops.DEFAULT_CONFIG}:family,runlocal', '--config.torchvision=False',
                             '--config.tag=t', f'--out={tmp_path}'])
  assert [r['op'] for r in result['rows']] == ['dcnv3', 'dcnv4', 'ms_deform_attn']
  for row in result['rows']:
    assert row['fwd_bwd_ratio_vs_conv'] == pytest.approx(row['ours_fwd_bwd_ms'] / row['conv_fwd_bwd_ms'])
  md = (tmp_path / 'bench_ops_family_t.md').read_text()
  assert '| dcnv4 | N=1 6x6, 2 groups of 4 |' in md and 'not run' in md


@pytest.mark.slow
def test_bench_ops_times_a_git_baseline_side_by_side(tmp_path):
  root = pathlib.Path(bench_ops.__file__).resolve().parent.parent
  if subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, check=False).returncode:
    pytest.skip('not a git checkout')
  with jax.numpy_dtype_promotion('standard'):
    result = bench_ops.main(runlocal(bench_ops, '--config.tag=t', '--config.baseline=HEAD', f'--out={tmp_path}'))
  row = result['rows'][0]
  assert row['base_fwd_ratio_vs_conv'] == pytest.approx(row['base_fwd_ms'] / row['conv_fwd_ms'])
  assert row['base_fwd_bwd_ratio_vs_conv'] == pytest.approx(row['base_fwd_bwd_ms'] / row['conv_fwd_bwd_ms'])
  assert 'fwd ratio at HEAD' in (tmp_path / 'bench_ops_t.md').read_text()
  with pytest.raises(SystemExit, match='--config.baseline=no-such-rev: cannot read deform_conv.py'):
    bench_ops.main(runlocal(bench_ops, '--config.baseline=no-such-rev', f'--out={tmp_path}'))


@pytest.mark.slow
def test_bench_train_times_loop_and_ideal_step(tmp_path):
  from experiments import bench_train

  with jax.numpy_dtype_promotion('standard'):
    result = bench_train.main(runlocal(bench_train, '--config.torch=False', f'--out={tmp_path}'))
  assert [(r['model'], r['setting']) for r in result['rows']] == [('cifarnet', 'regular'), ('cifarnet', 'modulated')]
  for row in result['rows']:
    assert row['loop_over_ideal'] == pytest.approx(row['loop_ms_per_step'] / row['ideal_ms_per_step'])
    assert row['ideal_images_per_s'] == pytest.approx(16e3 / row['ideal_ms_per_step'])
    assert row['loop_images_per_s'] == pytest.approx(16e3 / row['loop_ms_per_step'])
  md = next(tmp_path.glob('bench_train_*.md')).read_text()
  assert '| cifarnet | modulated |' in md and 'Shapes: cifarnet: batch 16 of 32x32x3 CIFAR-shaped.' in md


def test_bench_train_names_an_unknown_setting(capsys):
  from experiments import bench_train

  with pytest.raises(SystemExit) as exit_:
    bench_train.main(runlocal(bench_train, '--config.settings=regular,wobbly'))
  assert exit_.value.code == 2
  assert capsys.readouterr().err == ('error: --config.settings: unknown wobbly; choose from regular, deformable, '
                                     'modulated\n')
