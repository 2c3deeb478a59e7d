"""The training system on CPU: sharding, checkpoints and resume, signals, the command line, accuracy.

Everything runs in this process (conftest gives it 8 CPU devices) through the
same entry points a user calls: `train()` and the command line's `cli.main`.
Two tests need what one process cannot give, and start one subprocess each
(marked slow): a run killed with SIGKILL, and two processes forming one JAX job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from deformjax.train import ConfigError, Interrupted, base_config, cli, train, validate
from tests.helpers import (
  DIGITS_CONFIG,
  ROOT,
  SMALL_OVERRIDES,
  assert_same_params,
  at_step,
  last_line,
  leaves,
  losses,
  params_of,
  quiet,
  records,
  small_config,
  tiny_digits,
)


# Host-fed on 8 devices in the slow tier: the fast tier has 8 devices device-fed and host feeding on 1 (the
# resume test's device case, test_feeding's prefetcher).
@pytest.mark.parametrize('placement', ['device', pytest.param('host', marks=pytest.mark.slow)])
def test_eight_devices_match_one_device(placement):
  cfg_one = small_config(num_devices=1, data_placement=placement)
  one = train(cfg_one, echo=quiet)
  eight = train(small_config(num_devices=8, data_placement=placement), echo=quiet)
  assert one['devices'] == 1 and eight['devices'] == 8
  assert one['data_placement'] == eight['data_placement'] == placement
  assert len(losses(one)) == 6
  np.testing.assert_allclose(losses(eight), losses(one), rtol=2e-5)
  # Gradients are summed across 8 devices in another order than on 1. Adam divides
  # each gradient by its own running magnitude, so for near-zero gradients that
  # rounding shows at the scale of the step itself: 6 steps of lr 1e-3 move a
  # parameter by at most 6e-3, and the runs agree to 1 % of that.
  assert_same_params(leaves(eight['params']), leaves(one['params']), rtol=1e-4, atol=6e-5)
  start = leaves(initial_state(cfg_one)[0]['params'])
  moved = max(float(np.abs(a - start[k]).max()) for k, a in leaves(one['params']).items())
  assert moved > 1e-3  # the runs trained: the tolerance above is not vacuous
  np.testing.assert_allclose(eight['eval']['baseline']['accuracy'], one['eval']['baseline']['accuracy'], atol=1e-9)


def initial_state(cfg):
  """`(state, trainer, mesh, spec)`: what a run of `cfg` starts from (its seed's initial parameters)."""
  from deformjax.data import get_spec
  from deformjax.train import mesh as mesh_lib
  from deformjax.train.loop import model_factory
  from deformjax.train.steps import make_trainer

  spec, mesh = get_spec(cfg.dataset), mesh_lib.data_mesh(cfg.num_devices)
  trainer = make_trainer(model_factory(cfg, spec), cfg, spec, mesh, 1, 1)
  return trainer.init_state(cfg.seed), trainer, mesh, spec


class Crash(Exception):
  """Stands for a run that dies between checkpoints."""


def crash():
  raise Crash


def resume_config(workdir, placement, **kw):
  # Regular convs and 160 images: 5 steps an epoch, so 12 steps recompute the epoch order twice on resume.
  return small_config(deformable='none', num_devices=1, steps=12, log_every=2, checkpoint_every=4,
                      data_placement=placement, workdir=str(workdir), **kw)


# The host-fed case in the slow tier; the fast tier runs the same crash / SIGTERM / resume on device-resident data,
# and test_feeding's prefetcher test checks the position a host-fed checkpoint stores.
@pytest.mark.parametrize('placement', ['device', pytest.param('host', marks=pytest.mark.slow)])
def test_crashed_and_terminated_runs_resume_to_the_same_parameters(tmp_path, placement, capsys):
  """Host-fed runs checkpoint the prefetcher's position of the next batch not trained on; device-resident
  runs need none. The run crashes after step 7 (checkpoint 4), resumes, is stopped by SIGTERM after step 9
  (not a checkpoint step: it saves there), then resumes to the end through the command line."""
  sources = tiny_digits()
  straight = train(resume_config(tmp_path / 'straight', placement), echo=quiet, sources=sources)

  work = tmp_path / 'interrupted'
  with pytest.raises(Crash):
    train(resume_config(work, placement), echo=quiet, sources=sources, on_step=at_step(7, crash))
  assert max(r['step'] for r in records(work / 'metrics.jsonl')) == 6  # written past checkpoint 4
  lines, handler = [], signal.getsignal(signal.SIGTERM)
  with pytest.raises(Interrupted, match=r'stopped by signal at step 9; checkpoint saved in'):
    train(resume_config(work, placement), echo=lines.append, sources=sources,
          on_step=at_step(5, lambda: signal.raise_signal(signal.SIGTERM)))
  assert lines == [f'resumed from {work / "checkpoints"} at step 4']
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with the run

  resumed = train(resume_config(work, placement), echo=lines.append, sources=sources)
  assert lines[-2] == f'resumed from {work / "checkpoints"} at step 9'
  assert_same_params(leaves(resumed['params']), leaves(straight['params']))  # bit for bit
  assert resumed['eval'] == straight['eval']
  # metrics.jsonl of the interrupted run is the uninterrupted run's: lines a crashed run wrote
  # past its checkpoint are dropped on resume, and the window open at a checkpoint resumes with it.
  resumed_log, straight_log = records(work / 'metrics.jsonl'), records(tmp_path / 'straight' / 'metrics.jsonl')
  assert [r['step'] for r in resumed_log] == [2, 4, 6, 8, 10, 12, 12]
  assert resumed_log == straight_log


def run_cli(args, capsys, on_step=None):
  """`cli.main(args)` in this process: (exit status, stdout, stderr)."""
  try:
    cli.main(args, on_step=on_step)
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def test_the_command_line_trains_writes_its_files_and_exits_143_on_sigterm(tmp_path, capsys):
  args = [f'--config={DIGITS_CONFIG}', *SMALL_OVERRIDES, '--config.deformable=none', '--config.num_devices=1',
          f'--config.workdir={tmp_path / "run"}', '--config.checkpoint_every=4']
  code, _, err = run_cli(args, capsys, on_step=at_step(3, lambda: signal.raise_signal(signal.SIGTERM)))
  assert code == 143 and last_line(err).startswith('interrupted: stopped by signal at step 3; checkpoint saved in')
  code, out, err = run_cli([*args, f'--summary_json={tmp_path / "s.json"}', f'--params_out={tmp_path / "p.npz"}'],
                           capsys)
  assert code == 0, err
  assert f'resumed from {tmp_path / "run" / "checkpoints"} at step 3' in out
  assert '| baseline |' in out
  summary = json.loads((tmp_path / 's.json').read_text())
  assert summary['steps'] == 6 and summary['config']['deformable'] == 'none' and 'params' not in summary
  straight = train(small_config(deformable='none', num_devices=1), echo=quiet)
  assert_same_params(params_of(tmp_path / 'p.npz'), leaves(straight['params']))
  assert summary['eval'] == straight['eval']


@pytest.mark.parametrize('args,message', [
    (['--config.dataset=imagenet'], "error: config.dataset: unknown dataset 'imagenet'"),
    (['--config.batch_size=12'], 'error: config.batch_size=12 is not divisible by the 8 devices'),
    (['--config.dataset=mnist', '--config.data_dir=/nonexistent/tfds'],
     "error: config.data_dir: directory '/nonexistent/tfds' does not exist"),
    (['--config.deformable=7'], "error: config.deformable must be 'none', 'all' or a count in [0, 5]"),
    (['--config.num_devices=9'], 'error: config.num_devices: num_devices=9 but only 8'),
    (['--config.num_devices=-1'], 'error: config.num_devices must be 0 (all devices) or a positive int'),
    (['--config.workdir=README.md'], "error: config.workdir='README.md' is an existing file"),
    (['--config.steps=abc'], "error: flag --config.steps=abc: invalid literal for int()"),
    (['--config.nosuchfield=1'], "error: --config.nosuchfield: unknown config field 'nosuchfield' (the fields are"),
    (['--config.train_augment.nosuch=2'], "error: --config.train_augment.nosuch: unknown config field 'nosuch'"),
    (['--config.epoch=3'], "error: --config.epoch: unknown config field 'epoch': did you mean 'epochs'?\n"),
    (['--config.train_augment.max_shfit=3'],
     "error: --config.train_augment.max_shfit: unknown config field 'max_shfit': did you mean 'max_shift'?\n"),
    (['--nosuchflag'], "error: Unknown command line flag 'nosuchflag'"),
])
def test_bad_config_is_one_clear_line(args, message, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  code, _, err = run_cli([f'--config={DIGITS_CONFIG}', *args, '--config.progress=False'], capsys)
  assert code == 2 and err.count('\n') == 1 and err.startswith(message), err


def test_a_field_override_without_a_config_file_asks_for_one(capsys):
  code, _, err = run_cli(['--config.task=detection'], capsys)
  assert code == 2 and err == ('error: --config.task: a field override needs a config file to override: --config '
                               'FILE (e.g. experiments/configs/digits.py) --config.task=...\n'), err


CONFIG_FILES = {
    'missing.py': (None, "error: --config: [Errno 2] No such file or directory: '{path}'"),
    'text.txt': ('hello\n', "error: --config: {path}: NameError: name 'hello' is not defined"),
    'syntax.py': ('def get_config(:\n', 'error: --config: {path}: SyntaxError: '),
    'none.py': ('x = 1\n', "error: --config: {path}: AttributeError: module 'config_config' has no attribute "
                "'get_config'"),
    'raises.py': ('def get_config():\n  raise RuntimeError("no such preset")\n',
                  'error: --config: {path}: RuntimeError: no such preset'),
}


@pytest.mark.parametrize('name', list(CONFIG_FILES))
def test_a_bad_config_file_is_one_clear_line(tmp_path, name, capsys):
  source, message = CONFIG_FILES[name]
  path = tmp_path / name
  if source is not None:
    path.write_text(source)
  # The digits config first: a file without get_config() must not inherit the previous file's.
  assert run_cli([f'--config={DIGITS_CONFIG}', '--config.steps=-1', '--config.epochs=0'], capsys)[0] == 2
  code, _, err = run_cli([f'--config={path}'], capsys)
  assert code == 2 and err.count('\n') == 1 and err.startswith(message.format(path=path)), err


def test_a_missing_config_flag_is_one_clear_line(capsys):
  code, _, err = run_cli([], capsys)
  assert code == 2 and err == ('error: --config is required: a get_config() file, e.g. experiments/configs/digits.py '
                                'in a deformjax source checkout (a wheel ships none); the trainer needs '
                                "pip install 'deformjax[train,data]'\n")


def test_a_workdir_of_another_run_is_refused_by_name(tmp_path):
  cfg = small_config(steps=2, workdir=str(tmp_path), deformable='none', num_devices=1)
  train(cfg, echo=quiet)
  other = small_config(steps=2, workdir=str(tmp_path), num_devices=1)
  with pytest.raises(ConfigError, match=r"holds a checkpoint of another run \(deformable='none'; this run: "
                                        r"deformable='2'\); use another workdir, or delete it"):
    train(other, echo=quiet)
  (tmp_path / 'run.json').unlink()  # a checkpoint from before run.json: orbax's tree check, in one line
  with pytest.raises(ConfigError, match=r'holds a checkpoint this run cannot restore \(.*\); use another') as err:
    train(other, echo=quiet)
  assert '\n' not in str(err.value)


def untrained_accuracy(cfg) -> float:
  """Test accuracy of the parameters a run of `cfg` starts from."""
  from deformjax.data import load_source
  from deformjax.train import evaluate

  state, trainer, mesh, spec = initial_state(cfg)
  test = load_source(cfg.dataset, spec.splits[1])
  return evaluate(trainer, state['params'], test, spec, cfg, mesh)['baseline']['accuracy']


# 150 steps to a trained classifier: the slow tier. The fast tier trains the same default config (bfloat16,
# modulated) 20 steps in the test below, its loss falling.
@pytest.mark.slow
def test_digits_default_trains_a_deformable_classifier_well_above_its_start():
  cfg = base_config()
  cfg.steps, cfg.progress, cfg.num_devices = 150, False, 1
  summary = train(cfg, echo=quiet)  # under the suite's strict promotion
  assert summary['config']['deformable'] == '2' and summary['data_placement'] == 'device'
  before, after = untrained_accuracy(cfg), summary['eval']['baseline']['accuracy']
  assert after > 0.8 and after - before > 0.5, (before, after)


def test_bfloat16_compute_with_modulated_layers_trains():
  cfg = base_config()
  cfg.steps, cfg.log_every, cfg.progress, cfg.num_devices = 20, 5, False, 1
  cfg.dtype, cfg.modulated = 'bfloat16', True
  with jax.numpy_dtype_promotion('standard'):
    summary = train(cfg, echo=quiet)
  history = losses(summary)
  assert np.all(np.isfinite(history)) and history[-1] < history[0]
  params = jax.tree.leaves(summary['params'])
  assert all(p.dtype == np.float32 for p in params)  # bf16 compute, float32 parameters


@pytest.mark.parametrize('field,value,message', [
    ('log_every', 0, 'config.log_every must be a positive int, got 0'),
    ('batch_size', True, 'config.batch_size must be a positive int, got True'),  # Python's True == 1: a slip
    ('data_dir', '/tmp', "config.data_dir='/tmp' is not read by the digits dataset"),
    ('train_augment.max_rotation_deg', float('nan'), 'config.train_augment.max_rotation_deg must be a finite number'),
    ('train_augment.max_shift', float('inf'), 'config.train_augment.max_shift must be a finite number'),
    ('train_augment.scale_range', (0.0, 0.0), r'config.train_augment.scale_range must be \(low, high\) with 0 < low'),
    ('eval_sets.baseline.scale_range', (1.2, 0.8), r'config.eval_sets.baseline.scale_range must be'),
])
def test_validate_names_values_that_cannot_train(field, value, message):
  with pytest.raises(ConfigError, match=message):
    validate(small_config(**{field: value}), 1)
  validate(base_config(), 1)  # the defaults pass


# --- what needs its own processes ------------------------------------------------------------------------------

def subprocess_env(devices: int) -> dict:
  env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'JAX_NUM_CPU_DEVICES': str(devices), 'PYTHONPATH': str(ROOT)}
  env.pop('XLA_FLAGS', None)
  return env


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL gives the run no chance to save: it kills itself after step 10, with checkpoint 8's asynchronous
  save possibly in flight. The restart resumes from the last finalised checkpoint (4 or 8) and ends where an
  uninterrupted run ends."""
  work = tmp_path / 'killed'
  script = textwrap.dedent(f'''
      import os, signal
      import jax
      # The suite's settings (conftest), so that the resumed run here computes exactly what it computes there.
      jax.config.update('jax_enable_x64', True)
      jax.config.update('jax_numpy_dtype_promotion', 'strict')
      from deformjax.train import train
      from tests.helpers import small_config, tiny_digits
      cfg = small_config(deformable='none', num_devices=1, steps=12, log_every=2, checkpoint_every=4,
                         data_placement='host', workdir={str(work)!r})
      count = [0]
      def hook():
        count[0] += 1
        if count[0] == 10:
          os.kill(os.getpid(), signal.SIGKILL)
      train(cfg, echo=print, sources=tiny_digits(), on_step=hook)
  ''')
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=subprocess_env(1), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  sources = tiny_digits()
  straight = train(resume_config(tmp_path / 'straight', 'host'), echo=quiet, sources=sources)
  lines = []
  resumed = train(resume_config(work, 'host'), echo=lines.append, sources=sources)
  assert lines[0] in (f'resumed from {work / "checkpoints"} at step {s}' for s in (4, 8)), lines
  assert_same_params(leaves(resumed['params']), leaves(straight['params']))
  assert records(work / 'metrics.jsonl') == records(tmp_path / 'straight' / 'metrics.jsonl')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """Two processes of one device each, through the real command line, train what one process of two devices
  trains; process 0 alone writes the files, and a normal run prints no INFO logs."""
  single = train(small_config(num_devices=2), echo=quiet)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, '-m', 'deformjax.train', f'--config={DIGITS_CONFIG}', *SMALL_OVERRIDES,
                             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
                             f'--summary_json={tmp_path / f"proc{i}.json"}',
                             f'--params_out={tmp_path / f"proc{i}.params.npz"}'],
                            cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  multi = json.loads((tmp_path / 'proc0.json').read_text())
  assert multi['processes'] == 2 and multi['devices'] == 2
  assert not (tmp_path / 'proc1.json').exists() and not (tmp_path / 'proc1.params.npz').exists()  # process 0 reports
  np.testing.assert_allclose(losses(multi), losses(single), rtol=2e-5)
  assert_same_params(params_of(tmp_path / 'proc0.params.npz'), leaves(single['params']), rtol=1e-4, atol=6e-5)
  noise = [line for _, err in results for line in err.splitlines()
           if line[:1] == 'I' and line[1:5].isdigit() or 'Unable to initialize backend' in line]
  assert noise == [], noise[:3]


# --- parameter sharding ----------------------------------------------------------------------------------------

def test_kernel_and_bias_metadata_shard_a_deform_conv_over_a_2_device_mesh():
  """`kernel_metadata` / `bias_metadata` (nnx.Conv's arguments) carry the partitioning: under a 2-device mesh
  the output features of the kernel and bias are split in two, and the layer computes what it computes unsharded."""
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from deformjax.nn import DeformConv

  mesh = jax.make_mesh((2,), ('model',), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    layer = DeformConv(4, 6, 3, kernel_metadata={'out_sharding': (None, None, None, 'model')},
                       bias_metadata={'out_sharding': ('model',)}, bias_init=nnx.initializers.normal(1.0),
                       precision='highest', rngs=nnx.Rngs(0))
    kernel, bias = layer.kernel[...], layer.bias[...]
    assert kernel.sharding.spec == P(None, None, None, 'model') and bias.sharding.spec == P('model')
    assert len(kernel.sharding.device_set) == 2
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 4, 3)}
    assert {s.data.shape for s in bias.addressable_shards} == {(3,)}
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 4), jnp.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
  plain = DeformConv(4, 6, 3, bias_init=nnx.initializers.normal(1.0), precision='highest', rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(plain.kernel[...]), np.asarray(kernel))
  np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
