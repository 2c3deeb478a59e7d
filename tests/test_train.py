"""The training system on CPU: sharding, multi-process, checkpoints, errors, accuracy.

Runs that need their own JAX runtime (8 simulated devices, two processes, a
hard kill) go through the real command line in subprocesses.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deformjax.train import base_config, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'experiments' / 'configs' / 'digits.py')
# Small and fast, with augmentation on so the random streams are exercised too.
SMALL = ['--config.steps=6', '--config.batch_size=32', '--config.log_every=1', '--config.progress=False',
         '--config.train_augment.max_rotation_deg=30', '--config.train_augment.max_shift=2',
         '--config.eval_batch_size=64']


def cli(args, env_extra=None, **kw):
  env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env_extra or {})}
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen([sys.executable, '-m', 'deformjax.train', f'--config={CONFIG}', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_cli(args, env_extra=None, timeout=300):
  proc = cli(args, env_extra)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def summary_of(args, tmp_path, name, env_extra=None):
  """The run's summary JSON, with its final parameters (every leaf) under 'params'."""
  path = tmp_path / f'{name}.json'
  code, out, err = run_cli([*args, f'--summary_json={path}', f'--params_out={tmp_path / name}.npz'], env_extra)
  assert code == 0, err[-3000:]
  return {**json.loads(path.read_text()), 'params': params_of(tmp_path / f'{name}.npz')}


def params_of(path) -> dict:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_same_params(got: dict, want: dict, **tolerance):
  """Every leaf, not a checksum: equal to `tolerance` (exactly when none is given)."""
  assert sorted(got) == sorted(want) and len(want) > 4
  for key in want:
    if tolerance:
      np.testing.assert_allclose(got[key], want[key], err_msg=key, **tolerance)
    else:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def losses(summary):
  return np.array([h['loss'] for h in summary['train_history']])


@pytest.mark.parametrize('placement', ['device', 'host'])
def test_eight_devices_match_one_device(tmp_path, placement):
  args = [*SMALL, f'--config.data_placement={placement}']
  one = summary_of(args, tmp_path, 'one', {'JAX_NUM_CPU_DEVICES': '1'})
  eight = summary_of(args, tmp_path, 'eight', {'JAX_NUM_CPU_DEVICES': '8'})
  assert one['devices'] == 1 and eight['devices'] == 8
  assert one['data_placement'] == eight['data_placement'] == placement
  assert len(losses(one)) == 6
  np.testing.assert_allclose(losses(eight), losses(one), rtol=2e-5)
  # Gradients are summed across 8 devices in another order than on 1. Adam divides
  # each gradient by its own running magnitude, so for near-zero gradients that
  # rounding shows at the scale of the step itself: 6 steps of lr 1e-3 move a
  # parameter by at most 6e-3, and the runs agree to 1 % of that.
  assert_same_params(eight['params'], one['params'], rtol=1e-4, atol=6e-5)
  np.testing.assert_allclose(eight['eval']['baseline']['accuracy'], one['eval']['baseline']['accuracy'], atol=1e-9)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  single = summary_of([*SMALL], tmp_path, 'single', {'JAX_NUM_CPU_DEVICES': '2'})
  port = free_port()
  procs = [cli([*SMALL, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
                f'--summary_json={tmp_path / f"proc{i}.json"}', f'--params_out={tmp_path / f"proc{i}.params.npz"}'],
               {'JAX_NUM_CPU_DEVICES': '1'}) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  multi = json.loads((tmp_path / 'proc0.json').read_text())
  assert multi['processes'] == 2 and multi['devices'] == 2
  assert not (tmp_path / 'proc1.json').exists() and not (tmp_path / 'proc1.params.npz').exists()  # process 0 reports
  np.testing.assert_allclose(losses(multi), losses(single), rtol=2e-5)
  assert_same_params(params_of(tmp_path / 'proc0.params.npz'), single['params'], rtol=1e-4, atol=6e-5)


def finalized_steps(workdir: pathlib.Path):
  ckpts = workdir / 'checkpoints'
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def wait_for_checkpoint(workdir, at_least, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = finalized_steps(workdir)
    if steps and steps[-1] >= at_least:
      return steps[-1]
    if proc.poll() is not None:
      raise AssertionError(f'run ended before checkpoint {at_least}: {proc.stderr.read()[-3000:]}')
    time.sleep(0.02)
  raise AssertionError('no checkpoint appeared')


@pytest.mark.parametrize('placement', ['device', 'host'])
def test_killed_and_terminated_runs_resume_to_the_same_parameters(tmp_path, placement):
  """Host-fed runs checkpoint the prefetcher's position of the next batch not trained on; device-resident
  runs need none. Steps span two epochs (44 per epoch), so the epoch permutation is recomputed on resume."""
  args = ['--config.steps=80', '--config.batch_size=32', '--config.log_every=10', '--config.progress=False',
          '--config.checkpoint_every=4', '--config.train_augment.max_rotation_deg=20',
          f'--config.data_placement={placement}']
  straight = summary_of([*args, f'--config.workdir={tmp_path / "straight"}'], tmp_path, 'straight')

  work = tmp_path / 'interrupted'
  wargs = [*args, f'--config.workdir={work}']
  # 1. SIGKILL (no chance to save) right after a checkpoint appears.
  proc = cli(wargs)
  wait_for_checkpoint(work, 8, proc)
  proc.kill()
  proc.wait()
  killed_at = finalized_steps(work)[-1]
  assert killed_at < 80
  # 2. Resume, then SIGTERM: the run saves where it is and exits with 143.
  proc = cli(wargs)
  wait_for_checkpoint(work, killed_at + 4, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert 'interrupted: stopped by signal at step' in err
  termed_at = finalized_steps(work)[-1]
  assert killed_at < termed_at < 80
  # 3. Resume to the end.
  code, out, err = run_cli([*wargs, f'--summary_json={tmp_path / "resumed.json"}',
                            f'--params_out={tmp_path / "resumed.npz"}'])
  assert code == 0, err[-3000:]
  assert f'resumed from {work / "checkpoints"} at step {termed_at}' in out + err
  resumed = json.loads((tmp_path / 'resumed.json').read_text())
  assert_same_params(params_of(tmp_path / 'resumed.npz'), straight['params'])  # bit for bit
  assert resumed['eval']['baseline']['accuracy'] == straight['eval']['baseline']['accuracy']
  # metrics.jsonl of the interrupted run is the uninterrupted run's: lines a killed run wrote
  # past its checkpoint are dropped on resume, and the window open at a checkpoint resumes with it.
  records = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
  resumed_log, straight_log = records(work / 'metrics.jsonl'), records(tmp_path / 'straight' / 'metrics.jsonl')
  assert [r['step'] for r in resumed_log] == [10, 20, 30, 40, 50, 60, 70, 80, 80]
  assert resumed_log == straight_log


@pytest.mark.parametrize('args,env,message', [
    (['--config.dataset=imagenet'], {}, "error: config.dataset: unknown dataset 'imagenet'"),
    (['--config.batch_size=12'], {'JAX_NUM_CPU_DEVICES': '8'},
     'error: config.batch_size=12 is not divisible by the 8 devices'),
    (['--config.dataset=mnist', '--config.data_dir=/nonexistent/tfds'], {},
     "error: config.data_dir: directory '/nonexistent/tfds' does not exist"),
    (['--config.deformable=7'], {}, "error: config.deformable must be 'none', 'all' or a count in [0, 5]"),
    (['--config.num_devices=3'], {'JAX_NUM_CPU_DEVICES': '2'}, 'error: config.num_devices: num_devices=3 but only 2'),
    (['--config.num_devices=-1'], {}, 'error: config.num_devices must be 0 (all devices) or a positive int'),
    (['--config.workdir=README.md'], {}, "error: config.workdir='README.md' is an existing file"),
])
def test_bad_config_is_one_clear_line(args, env, message):
  code, out, err = run_cli([*args, '--config.progress=False'], env)
  assert code == 2
  assert 'Traceback' not in err
  last = [l for l in err.strip().splitlines() if l.strip()][-1]
  assert last.startswith(message), last


CONFIG_FILES = {
    'missing': (None, "error: --config: no config file '{path}'"),
    'text.txt': ('hello\n', "error: --config: '{path}' is not a Python file"),
    'syntax.py': ('def get_config(:\n', 'error: --config: {path} line 1: invalid syntax'),
    'none.py': ('x = 1\n', 'error: --config: {path} defines no get_config() function'),
    'raises.py': ('def get_config():\n  raise RuntimeError("no such preset")\n',
                  'error: --config: {path}: get_config() raised RuntimeError: no such preset'),
}


@pytest.mark.parametrize('name', list(CONFIG_FILES))
def test_a_bad_config_file_is_one_clear_line(tmp_path, name):
  source, message = CONFIG_FILES[name]
  path = tmp_path / name
  if source is not None:
    path.write_text(source)
  proc = subprocess.run([sys.executable, '-m', 'deformjax.train', f'--config={path}'], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(message.format(path=path)), proc.stderr[-2000:]


@pytest.mark.parametrize('override', ['--config.nosuchfield=1', '--config.train_augment.nosuch=2'])
def test_an_unknown_config_field_is_one_clear_line(override):
  code, _, err = run_cli([override])
  field = override.split('=')[0].split('.')[-1]
  assert code == 2 and 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith(f"error: {override.split('=')[0]}: the config has no field '{field}'")


def test_a_workdir_of_another_run_is_refused_by_name(tmp_path):
  from deformjax.train import ConfigError

  cfg = base_config()
  cfg.steps, cfg.progress, cfg.workdir, cfg.deformable = 2, False, str(tmp_path), 'none'
  train(cfg, echo=lambda *_: None)
  other = base_config()
  other.steps, other.progress, other.workdir = 2, False, str(tmp_path)
  with pytest.raises(ConfigError, match=r"holds a checkpoint of another run \(deformable='none'; this run: "
                                        r"deformable='2'\); use another workdir, or delete it"):
    train(other, echo=lambda *_: None)
  (tmp_path / 'run.json').unlink()  # a checkpoint from before run.json: orbax's tree check, in one line
  with pytest.raises(ConfigError, match=r'holds a checkpoint this run cannot restore \(.*\); use another') as err:
    train(other, echo=lambda *_: None)
  assert '\n' not in str(err.value)


def test_a_normal_run_prints_no_info_logs(tmp_path):
  code, out, err = run_cli([*SMALL, f'--config.workdir={tmp_path}'])
  assert code == 0, err[-2000:]
  noise = [l for l in err.splitlines() if l[:1] == 'I' and l[1:5].isdigit() or 'Unable to initialize backend' in l]
  assert noise == [], noise[:3]


def test_digits_default_trains_a_deformable_classifier_well_above_chance():
  cfg = base_config()
  cfg.steps = 150
  cfg.progress = False
  summary = train(cfg, echo=lambda *_: None)  # under the suite's strict promotion
  assert summary['config']['deformable'] == '2' and summary['data_placement'] == 'device'
  assert summary['eval']['baseline']['accuracy'] > 0.8  # chance is 0.1


def test_bfloat16_compute_with_modulated_layers_trains():
  cfg = base_config()
  cfg.steps, cfg.log_every, cfg.progress = 20, 5, False
  cfg.dtype, cfg.modulated = 'bfloat16', True
  with jax.numpy_dtype_promotion('standard'):
    summary = train(cfg, echo=lambda *_: None)
  history = losses(summary)
  assert np.all(np.isfinite(history)) and history[-1] < history[0]
  params = jax.tree.leaves(summary['params'])
  assert all(p.dtype == np.float32 for p in params)  # bf16 compute, float32 parameters


@pytest.mark.parametrize('field,value,message', [
    ('log_every', 0, 'config.log_every must be a positive int, got 0'),
    ('data_dir', '/tmp', "config.data_dir='/tmp' is not read by the digits dataset"),
    ('train_augment.max_rotation_deg', float('nan'), 'config.train_augment.max_rotation_deg must be a finite number'),
    ('train_augment.max_shift', float('inf'), 'config.train_augment.max_shift must be a finite number'),
    ('train_augment.scale_range', (0.0, 0.0), r'config.train_augment.scale_range must be \(low, high\) with 0 < low'),
    ('eval_sets.baseline.scale_range', (1.2, 0.8), r'config.eval_sets.baseline.scale_range must be'),
])
def test_validate_names_values_that_cannot_train(field, value, message):
  from deformjax.train import ConfigError, validate

  cfg = base_config()
  *parents, leaf = field.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate(cfg, 1)
  validate(base_config(), 1)  # the defaults pass
