"""Random model weights drawn in numpy from the abstract parameter tree: no compile of `init`.

For tests and load tests that need a model whose outputs depend on its input: a freshly
initialised tiny T5 greedy-decodes the same token (pad) for every prompt, which can hide a mix-up
of rows and streams no text."""
import jax
import jax.numpy as jnp
import numpy as np

from t5like.models.transformer import abstract_params


def random_params(cfg, seed: int = 0, embed_std: float = 1.0, std: float = 0.1):
  """Embedding ~ N(0, embed_std), relative-position tables ~ N(0, 0.5), norm scales ~ 1 + N(0, std),
  every other weight ~ N(0, std)."""
  rng = np.random.RandomState(seed)

  def draw(path, x):
    where = jax.tree_util.keystr(path)
    s = embed_std if 'embedding' in where and 'rel_' not in where else 0.5 if 'rel_' in where else std
    value = rng.normal(0.0, s, x.shape)
    return jnp.asarray(1.0 + value if where.endswith("['scale']") else value, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))
