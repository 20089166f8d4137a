"""The pipeline schedule on a toy layer stack: same outputs and gradients as the plain loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import ConfigError, MeshConfig
from t5like.parallel import mesh as mesh_lib, pipeline

B, D = 16, 8


class ToyGroup(nn.Module):
  """A layer group with the LayerGroup call signature: (x, cache, *broadcast_args)."""

  @nn.compact
  def __call__(self, x_BD, cache, bias_BD, scale):
    w = self.param('w', nn.initializers.normal(0.5), (D, D))
    return jnp.tanh(x_BD @ w + bias_BD) * scale, None


def _sequential(params, x, bias, scale):
  for g in range(params['w'].shape[0]):
    x, _ = ToyGroup().apply({'params': {'w': params['w'][g]}}, x, None, bias, scale)
  return x


@pytest.mark.parametrize('stages,micro,repeats', [(4, 2, 1), (4, 4, 2)])
def test_schedule_matches_sequential(stages, micro, repeats):
  G = stages * repeats * 2
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(0, 0.5, (G, D, D)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)    # per example: split per microbatch
  scale = jnp.asarray([1.5], jnp.float32)                      # broadcast to every microbatch
  mesh_cfg = MeshConfig(data=-1, stage=stages, rules='pp_dp', num_microbatches=micro,
                        pipeline_repeats=repeats)
  mesh = mesh_lib.make_mesh(mesh_cfg)
  group = ToyGroup(parent=None)

  def piped(p, x):
    return jnp.sum(pipeline.run_stack(group, p, x, (bias, scale), pipeline.active_schedule()) ** 2)

  def plain(p, x):
    return jnp.sum(_sequential(p, x, bias, scale) ** 2)

  with mesh_lib.activate(mesh, 'pp_dp', mesh_cfg):
    assert pipeline.active_schedule() == pipeline.Schedule(stages, micro, repeats)
    out, grads = jax.jit(jax.value_and_grad(piped, argnums=(0, 1)))(params, x)
  ref, ref_grads = jax.value_and_grad(plain, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    # Microbatch gradients are summed in another order: compare against the largest entry.
    assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * float(jnp.max(jnp.abs(r)))
  assert pipeline.active_schedule() is None


def test_bubble_fraction():
  assert pipeline.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert pipeline.bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)
  default = pipeline.Schedule(4, mesh_lib.num_microbatches(MeshConfig(stage=4), 4))
  assert default.microbatches == 8 and default.iterations == 11
  assert pipeline.describe(default)['bubble_fraction'] == round(3 / 11, 4)
  assert pipeline.bubble_fraction(1, 1) == 0.0


def test_schedule_errors():
  with pytest.raises(ConfigError, match='needs mesh.num_microbatches >= mesh.stage'):
    pipeline.Schedule(stages=4, microbatches=2, repeats=2)
  with pytest.raises(ConfigError, match='microbatches must be >= 1'):
    pipeline.Schedule(stages=2, microbatches=0)
  mesh_cfg = MeshConfig(data=-1, stage=2, rules='pp_dp', num_microbatches=3)
  params = {'w': jnp.zeros((4, D, D))}
  with mesh_lib.activate(mesh_lib.make_mesh(mesh_cfg), 'pp_dp', mesh_cfg):
    with pytest.raises(ConfigError, match='batch 16 is not divisible by mesh.num_microbatches=3'):
      pipeline.run_stack(ToyGroup(parent=None), params, jnp.zeros((B, D)),
                         (jnp.zeros((B, D)), jnp.ones((1,))), pipeline.active_schedule())
  with pytest.raises(ConfigError, match="active mesh has 'stage'=1"):
    pipeline.run_stack(ToyGroup(parent=None), params, jnp.zeros((B, D)),
                       (jnp.zeros((B, D)), jnp.ones((1,))), pipeline.Schedule(2, 2))
  with pytest.raises(ConfigError, match='pass its MeshConfig'):
    with mesh_lib.activate(mesh_lib.make_mesh(mesh_cfg), 'pp_dp'):
      pass
