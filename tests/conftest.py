"""Test-wide JAX settings.

float64 is enabled so that the loop references in `reference.py` are exact
oracles; every float32/bf16 test names its dtype explicitly. Strict dtype
promotion and rank promotion raise (equinox does the same), so the library
never relies on an implicit upcast or broadcast.
"""

import jax

jax.config.update('jax_enable_x64', True)
jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')
