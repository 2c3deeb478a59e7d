"""The ONNX export benchmark (`experiments/bench_onnx.py`): onnxruntime (CPU) beside JAX's jitted CPU time.

  python -m experiments.bench_onnx --out experiments/results
  python -m experiments.bench_onnx --config.repeats=10 --config.ops=False      # classifiers only
  python -m experiments.bench_onnx --config.profile=True                      # + onnxruntime's per-op-type time
  python -m experiments.bench_onnx --config=experiments/configs/bench_onnx.py:runlocal   # a smoke test
"""

import ml_collections

# The classifiers of experiments/bench_onnx.py (CLASSIFIERS); comma-separated on the command line.
CLASSIFIERS = ('conv5-deformable2-modulated', 'cifarnet-deformable-all', 'conv5-regular', 'cifarnet-regular')
# deform_conv2d's shapes (N, H=W, C_in=C_out): the CPU shapes of experiments/bench_ops.py.
OP_SHAPES = ((64, 7, 32), (64, 16, 64), (8, 64, 64))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: None, or `runlocal` (one deformable classifier at batch 1, one tiny op shape: seconds)."""
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; choose runlocal or none')
  c = ml_collections.ConfigDict()
  c.classifiers = CLASSIFIERS
  c.batches = (64, 1)
  c.repeats = 60  # timed runs per case, split over the rounds
  c.rounds = 3  # interleaved timing rounds
  c.ops = True  # also time deform_conv2d at `op_shapes`
  c.op_shapes = OP_SHAPES
  c.profile = False  # add onnxruntime's time per operator type
  if arg == 'runlocal':
    c.classifiers, c.batches = ('conv5-deformable2-modulated',), (1,)
    c.repeats, c.rounds = 2, 1
    c.op_shapes = ((2, 6, 4),)
  return c
