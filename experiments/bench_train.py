"""Benchmark the training loop against the ideal step, per model and setting (and the original study's PyTorch nets).

For each model (the 5-conv classifier on digits, CifarNet on CIFAR-10-shaped
data) and setting (regular, deformable, modulated) it times, side by side:

- **loop**: `deformjax.train.train` run for `--steps` steps after its compiling
  one (its own `seconds_per_step`: data feeding, dispatch and metrics included,
  evaluation excluded);
- **ideal**: the same jitted train step (`Trainer.resident_step`) on the same
  device-resident split, called back to back with nothing around it.

Every setting is compiled and warmed up before timing, and the timed repeats
are interleaved round by round, so no setting pays another's start-up. Where
torch + torchvision import, the original study's `Net` and `Deformable_Net` (written from
the study's description: torchvision `DeformConv2d` with a conv predicting its
offsets, Adam, batch 64) train on CIFAR-shaped data already on the device, in
the same rounds. Writes bench_train_<platform>.json / .md under `--out` (runs/;
`--out experiments/results` refreshes the committed ones). The config
(experiments/configs/bench_train.py) holds every setting:

  python -m experiments.bench_train                                        # CPU: a few minutes
  python -m experiments.bench_train --config.steps=200 --config.rounds=5   # on a GPU
  python -m experiments.bench_train --config=experiments/configs/bench_train.py:runlocal   # a smoke test
"""

from __future__ import annotations

import pathlib
import statistics
import time

import jax
import numpy as np

from experiments.common import bench_main, benchmark_header, benchmark_metadata, config_names

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'bench_train.py'
SETTINGS = {'regular': ('none', False), 'deformable': ('all', False), 'modulated': ('all', True)}
MODELS = {'conv5': 'digits', 'cifarnet': 'cifar10'}


def sources_for(dataset: str, examples: int):
  """(train, test) sources: the embedded digits, or random CIFAR-shaped uint8 data (timing needs no real CIFAR)."""
  from deformjax.data import ArraySource, load_source

  if dataset == 'digits':
    return load_source('digits', 'train'), load_source('digits', 'test')
  rng = np.random.default_rng(0)
  make = lambda n: ArraySource(rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                               rng.integers(0, 10, size=n).astype(np.int32))
  return make(examples), make(256)


def config_for(model: str, setting: str, steps: int, batch: int):
  from deformjax.train import base_config

  cfg = base_config()
  cfg.model, cfg.dataset = model, MODELS[model]
  cfg.deformable, cfg.modulated = SETTINGS[setting]
  cfg.steps, cfg.batch_size, cfg.log_every, cfg.progress = steps + 1, batch, 50, False
  cfg.eval_batch_size = 256
  return cfg


def ideal_runner(cfg, sources):
  """`run(k)`: k calls of the jitted train step on device-resident data, blocked at the end."""
  from deformjax.data import get_spec
  from deformjax.train import feeding
  from deformjax.train import mesh as mesh_lib
  from deformjax.train.loop import model_factory
  from deformjax.train.steps import augment_arrays, make_trainer

  mesh = mesh_lib.data_mesh(cfg.num_devices)
  spec = get_spec(cfg.dataset)
  split = feeding.DeviceSplit.place(*feeding.read_split(sources[0], spec), mesh)
  steps_per_epoch = split.size // cfg.batch_size
  trainer = make_trainer(model_factory(cfg, spec), cfg, spec, mesh, steps_per_epoch, cfg.steps)
  aug = augment_arrays(cfg.train_augment)
  box = {'state': trainer.init_state(cfg.seed)}
  permutation = feeding.epoch_permutation(mesh, cfg.seed, 0, split.size)

  def run(k):
    state = box['state']
    for _ in range(k):
      state, _ = trainer.resident_step(state, split.images, split.labels, permutation, aug)
    jax.block_until_ready(state)
    box['state'] = state

  return run


def loop_seconds_per_step(cfg, sources) -> float:
  from deformjax.train import train

  return train(cfg, echo=lambda *_: None, sources=sources)['seconds_per_step']


def study_nets() -> tuple[type, type]:
  """The original study's `Net` and `Deformable_Net` as PyTorch classes (torch and torchvision imported here)."""
  import torch
  import torchvision
  from torch import nn
  from torch.nn import functional as F

  class Net(nn.Module):  # the original study's net: conv 3->40 (3x3), max pool, conv 40->25 (2x2), avg pool, FC 300, 100, 10
    def __init__(self):
      super().__init__()
      self.conv1, self.conv2 = nn.Conv2d(3, 40, 3), nn.Conv2d(40, 25, 2)
      self.lin1, self.lin2, self.lin3 = nn.Linear(25 * 7 * 7, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x):
      x = F.max_pool2d(F.leaky_relu(self.conv1(x)), 2)
      x = F.avg_pool2d(F.leaky_relu(self.conv2(x)), 2)
      return self.lin3(F.leaky_relu(self.lin2(F.leaky_relu(self.lin1(torch.flatten(x, 1))))))

  class DeformConv(nn.Module):  # the original study's layer: torchvision DeformConv2d, offsets from a plain conv, padding 1
    def __init__(self, cin, cout, k):
      super().__init__()
      self.deformable = torchvision.ops.DeformConv2d(cin, cout, k, padding=1)
      self.offsets = nn.Conv2d(cin, 2 * k * k, k, padding=1)

    def forward(self, x):
      return self.deformable(x, self.offsets(x))

  class DeformableNet(nn.Module):  # the original study's net: both convs deformable (padded), two max pools, FC 25*8*8 -> ...
    def __init__(self):
      super().__init__()
      self.conv1, self.conv2 = DeformConv(3, 40, 3), DeformConv(40, 25, 2)
      self.lin1, self.lin2, self.lin3 = nn.Linear(25 * 8 * 8, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x):
      x = F.max_pool2d(F.leaky_relu(self.conv1(x)), 2)
      x = F.max_pool2d(F.leaky_relu(self.conv2(x)), 2)
      return self.lin3(F.leaky_relu(self.lin2(F.leaky_relu(self.lin1(torch.flatten(x, 1))))))

  return Net, DeformableNet


def torch_runners(batch: int, steps: int):
  """{name: run(k)} for the original study's two nets on CIFAR-shaped data on the device; {} without torch."""
  try:
    import torch
    import torchvision
    from torch import nn
  except ImportError:
    return {}, None
  Net, DeformableNet = study_nets()
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  gen = torch.Generator(device='cpu').manual_seed(0)
  images = torch.rand((batch * 8, 3, 32, 32), generator=gen).to(device)
  labels = torch.randint(0, 10, (batch * 8,), generator=gen).to(device)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def runner(net):
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters())
    loss_fn = nn.CrossEntropyLoss()
    position = [0]

    def run(k):
      for _ in range(k):
        i = position[0] % 8
        position[0] += 1
        x, y = images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
      sync()

    return run

  versions = {'torch': torch.__version__, 'torchvision': torchvision.__version__, 'device': str(device)}
  return {'study Net': runner(Net()), 'study Deformable_Net': runner(DeformableNet())}, versions


def timed_rounds(cfg, cases, sources, ideal, torch_runs) -> tuple[dict, dict, dict]:
  """Seconds per step of every case, ideal and loop, and of the PyTorch nets, over interleaved rounds."""
  for run in [*ideal.values(), *torch_runs.values()]:
    run(3)  # compile and warm up every setting before any timing
  for c in cases:  # the loop compiles inside train(): one untimed run per setting first
    loop_seconds_per_step(config_for(*c, 2, cfg.batch_size), sources[c[0]])
  ideal_s: dict = {c: [] for c in cases}
  loop_s: dict = {c: [] for c in cases}
  torch_s: dict = {n: [] for n in torch_runs}
  for r in range(cfg.rounds):
    for c in cases:
      t0 = time.perf_counter()
      ideal[c](cfg.steps)
      ideal_s[c].append((time.perf_counter() - t0) / cfg.steps)
      loop_s[c].append(loop_seconds_per_step(config_for(*c, cfg.steps, cfg.batch_size), sources[c[0]]))
    for name, run in torch_runs.items():
      t0 = time.perf_counter()
      run(cfg.steps)
      torch_s[name].append((time.perf_counter() - t0) / cfg.steps)
    print(f'round {r + 1}/{cfg.rounds} done', flush=True)
  return ideal_s, loop_s, torch_s


def run(cfg) -> dict:
  """Times every (model, setting) of the config, loop and ideal step, and the PyTorch nets (see the docstring)."""
  cases = [(m, s) for m in config_names(cfg, 'models', MODELS) for s in config_names(cfg, 'settings', SETTINGS)]
  sources = {m: sources_for(MODELS[m], cfg.examples) for m, _ in cases}
  ideal = {c: ideal_runner(config_for(*c, cfg.steps, cfg.batch_size), sources[c[0]]) for c in cases}
  torch_runs, torch_versions = torch_runners(cfg.batch_size, cfg.steps) if cfg.torch else ({}, None)
  ideal_s, loop_s, torch_s = timed_rounds(cfg, cases, sources, ideal, torch_runs)
  ms = lambda xs: 1e3 * statistics.median(xs)
  rows = []
  for (model, setting) in cases:
    loop_ms, ideal_ms = ms(loop_s[(model, setting)]), ms(ideal_s[(model, setting)])
    rows.append({'model': model, 'setting': setting, 'loop_ms_per_step': loop_ms, 'ideal_ms_per_step': ideal_ms,
                 'loop_over_ideal': loop_ms / ideal_ms, 'loop_images_per_s': 1e3 * cfg.batch_size / loop_ms,
                 'ideal_images_per_s': 1e3 * cfg.batch_size / ideal_ms})
  torch_rows = [{'model': name, 'ms_per_step': ms(t), 'images_per_s': 1e3 * cfg.batch_size / ms(t)}
                for name, t in torch_s.items()]
  shapes = {'conv5': '28x28x1 digits', 'cifarnet': '32x32x3 CIFAR-shaped'}
  return {'name': 'bench_train', 'benchmark': 'Training step: loop vs ideal', **benchmark_metadata(),
          'shapes': [f'{m}: batch {cfg.batch_size} of {shapes[m]}' for m in dict.fromkeys(m for m, _ in cases)],
          'batch_size': cfg.batch_size, 'steps': cfg.steps, 'rounds': cfg.rounds, 'torch': torch_versions,
          'rows': rows, 'torch_rows': torch_rows,
          'method': f'median over {cfg.rounds} interleaved rounds of {cfg.steps} steps, every setting compiled '
                    'and warmed up first; loop = deformjax.train.train seconds_per_step, ideal = the jitted step '
                    'called back to back on device-resident data'}


def table(result: dict) -> str:
  """The loop-vs-ideal table, and the PyTorch nets' where they ran."""
  lines = ['| model | setting | loop ms/step | ideal ms/step | loop / ideal | loop img/s | ideal img/s |',
           '|---|---|---|---|---|---|---|']
  lines += [f"| {r['model']} | {r['setting']} | {r['loop_ms_per_step']:.2f} | {r['ideal_ms_per_step']:.2f} | "
            f"{r['loop_over_ideal']:.2f}x | {r['loop_images_per_s']:.0f} | {r['ideal_images_per_s']:.0f} |"
            for r in result['rows']]
  if result['torch_rows']:
    tv = result['torch']
    lines += ['', f"PyTorch ({tv['device']}, torch {tv['torch']}, torchvision {tv['torchvision']}), same rounds, "
              'data on the device:', '', '| model | ms/step | img/s |', '|---|---|---|']
    lines += [f"| {r['model']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.0f} |" for r in result['torch_rows']]
  return '\n'.join(lines)


def markdown(result: dict) -> str:
  return f"# {result['benchmark']}\n\n{benchmark_header(result)}\n\n{table(result)}\n"


def main(args=None) -> dict:
  """`python -m experiments.bench_train [--config FILE[:ARG]] [--config.FIELD=VALUE ...] [--out DIR]`."""
  result = bench_main(args, 'experiments.bench_train', DEFAULT_CONFIG, run, markdown,
                      lambda cfg: f'bench_train_{jax.devices()[0].platform}')
  print('\n' + table(result))
  return result


if __name__ == '__main__':
  main()
