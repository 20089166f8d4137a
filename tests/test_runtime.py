"""free_compiled_programs: drops compiled programs (and their memory mappings) when asked."""
import jax
import jax.numpy as jnp
import numpy as np

from t5like import runtime


def test_freeing_compiled_programs_releases_their_mappings():
  counts = runtime.map_count_and_limit()
  assert counts is not None and counts[0] > 0 and counts[1] > 0
  fns = [jax.jit(lambda x, i=i: jnp.sin(x) * i + x.sum()) for i in range(60)]
  for i, f in enumerate(fns):
    f(jnp.ones((i + 1,))).block_until_ready()
  held = runtime.map_count_and_limit()[0]
  # Below the share nothing happens; forced, the 60 programs' mappings go.
  assert not runtime.free_compiled_programs(share=1.0)
  assert runtime.free_compiled_programs(force=True)
  freed = held - runtime.map_count_and_limit()[0]
  assert freed > 60 * 4, (held, freed)
  np.testing.assert_allclose(fns[3](jnp.ones((4,))), np.full(4, 3 * np.sin(1.0) + 4), rtol=1e-6)
