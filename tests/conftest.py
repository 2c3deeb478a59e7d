"""Test-wide JAX settings.

float64 is enabled so that the loop references in `reference.py` are exact
oracles; every float32/bf16 test names its dtype explicitly. Strict dtype
promotion and rank promotion raise (equinox does the same), so the library
never relies on an implicit upcast or broadcast.

The CPU backend exposes 8 devices, so that sharded training (8 devices against
`num_devices=1`), 2-device meshes and multi-device checkpoints are tested in
this process instead of in fresh interpreters. The setting only takes effect
before JAX starts its backends, which is why it lives here, ahead of every
test module. Unsharded computations still run on device 0 alone, as without it;
what changes is `jax.devices()` and the default training mesh (all devices).
"""

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_enable_x64', True)
jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')
