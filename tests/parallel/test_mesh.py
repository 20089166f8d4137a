"""Meshes, rule presets, divisibility errors and the replicated-parameter check (8 CPU devices)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5like.config import ConfigError, MeshConfig, get_variant
from t5like.models import transformer
from t5like.parallel import mesh as mesh_lib, partition


def test_fill_and_axes():
  mesh = mesh_lib.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
  assert mesh.axis_names == ('data', 'fsdp', 'tensor', 'stage')
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2, 'stage': 1}
  assert mesh_lib.mesh_shape(MeshConfig(data=2, fsdp=-1, dcn_data=2), 16) == {
      'data': 4, 'fsdp': 4, 'tensor': 1, 'stage': 1}


@pytest.mark.parametrize('cfg,match', [
    (MeshConfig(data=-1, tensor=3), 'fixed axes multiply to 3, which does not divide the 8'),
    (MeshConfig(data=2, fsdp=2), 'has 4 devices but 8 are available'),
    (MeshConfig(data=-1, dcn_data=3), 'multiply to 3 slices, which does not divide the 8'),
])
def test_impossible_sizes_name_the_problem(cfg, match):
  with pytest.raises(ConfigError, match=match):
    mesh_lib.make_mesh(cfg)


def test_config_rejects_bad_fields():
  with pytest.raises(ConfigError, match='mesh.tensor'):
    MeshConfig(tensor=0)
  with pytest.raises(ConfigError, match='mesh.pipeline_repeats'):
    MeshConfig(pipeline_repeats=0)
  with pytest.raises(ConfigError, match="unknown mesh.rules preset 'tpp'"):
    mesh_lib.get_rules('tpp')


def test_hybrid_mesh_needs_slices_or_processes():
  # One process, no slices: two DCN granules cannot be found, and the error says so.
  with pytest.raises(ConfigError, match='dcn'):
    mesh_lib.make_mesh(MeshConfig(data=4, dcn_data=2))


def test_model_dimension_not_divisible_is_named():
  mesh_cfg = MeshConfig(data=1, tensor=8, rules='tp')
  mesh = mesh_lib.make_mesh(mesh_cfg)
  with pytest.raises(ConfigError,
                     match=r'model.num_heads=4 is not divisible by mesh axis tensor=8'):
    mesh_lib.check_model_fits(get_variant('t5_tiny'), mesh_cfg, mesh)
  pp = MeshConfig(data=2, stage=4, rules='pp_dp')
  with pytest.raises(ConfigError, match=r'num_encoder_layers=2 .* not divisible by mesh.stage x '
                                        r'mesh.pipeline_repeats = 4 x 1'):
    mesh_lib.check_model_fits(get_variant('t5_tiny'), pp, mesh_lib.make_mesh(pp))
  with pytest.raises(ConfigError, match="do not map 'layers' to 'stage'"):
    no_pp = MeshConfig(data=2, stage=4, rules='dp')
    mesh_lib.check_model_fits(get_variant('t5_tiny', num_encoder_layers=4, num_decoder_layers=4),
                              no_pp, mesh_lib.make_mesh(no_pp))
  with pytest.raises(ConfigError, match='global batch 12 is not divisible by data x fsdp = 8'):
    dp = MeshConfig(data=8)
    mesh_lib.check_model_fits(get_variant('t5_tiny'), dp, mesh_lib.make_mesh(dp), 12)


def test_indivisible_leaf_is_named():
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=8, rules='fsdp'))
  box = {'w': nn.Partitioned(jax.ShapeDtypeStruct((6, 4), jnp.float32), names=('embed', 'mlp'))}
  with pytest.raises(ConfigError, match=r"w: dimension 0 \('embed', size 6\) .* fsdp=8"):
    partition.logical_shardings(box, mesh, mesh_lib.get_rules('fsdp'))


def test_rule_presets_resolve_as_intended():
  """'batch' takes ('data', 'fsdp') on activations even though params use 'fsdp' for 'embed'."""
  to_spec = lambda names, rules: nn.logical_to_mesh_axes(names, mesh_lib.get_rules(rules))
  assert to_spec(('batch', 'length', 'embed'), 'fsdp') == P(('data', 'fsdp'), None, None)
  assert to_spec(('batch', 'length', 'vocab'), 'fsdp_tp') == P(('data', 'fsdp'), None, 'tensor')
  assert to_spec(('layers', 'embed', 'mlp'), 'fsdp') == P(None, 'fsdp', None)
  assert to_spec(('layers', 'embed', 'heads', 'kv'), 'pp_fsdp_tp') == P('stage', 'fsdp', 'tensor',
                                                                          None)
  assert to_spec(('vocab', 'embed'), 'tp') == P('tensor', None)


def test_logits_sharded_only_under_activate():
  """The legacy `with mesh:` leaves flax's constraints inactive (logits replicated); activate()
  enters jax.set_mesh, and the logits come out split over the batch axes."""
  cfg = get_variant('t5_tiny')
  mesh_cfg = MeshConfig(data=1, fsdp=8, rules='fsdp')
  mesh = mesh_lib.make_mesh(mesh_cfg)
  rules = mesh_lib.get_rules('fsdp')
  model = transformer.build_model(cfg)
  params = jax.jit(lambda r: nn.unbox(model.init(r, *transformer.dummy_inputs(cfg))['params']))(
      jax.random.key(0))
  tokens = jnp.ones((8, 4), jnp.int32)
  fwd = jax.jit(lambda p, t: model.apply({'params': p}, t, t))
  with mesh_lib.activate(mesh, rules, mesh_cfg):
    logits = fwd(params, tokens)
  assert logits.sharding.shard_shape(logits.shape) == (1, 4, cfg.vocab_size)
  with pytest.warns(DeprecationWarning):
    with mesh, nn.logical_axis_rules(rules):
      legacy = jax.jit(lambda p, t: model.apply({'params': p}, t, t))(params, tokens)
  assert legacy.sharding.is_fully_replicated      # pinned: why activate() exists
  np.testing.assert_allclose(np.asarray(legacy), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_find_replicated_flags_large_replicated_params():
  cfg = get_variant('t5_small')
  abstract = jax.eval_shape(lambda r: transformer.build_model(cfg).init(
      r, *transformer.dummy_inputs(cfg))['params'], jax.random.key(0))
  shapes = nn.unbox(abstract)
  for rules, expect_any in (('dp', True), ('fsdp', False)):
    mesh = mesh_lib.make_mesh(MeshConfig(data=-1, fsdp=8 if rules == 'fsdp' else 1, rules=rules))
    shardings = partition.logical_shardings(abstract, mesh, mesh_lib.get_rules(rules))
    if expect_any:
      with pytest.warns(UserWarning, match='fully replicated'):
        found = partition.find_replicated(shapes, shardings, min_bytes=1 << 20)
      names = [n for n, _, _ in found]
      assert 'shared_embedding/embedding' in names
      assert found[0][2] >= found[-1][2] >= 1 << 20
    else:
      assert partition.find_replicated(shapes, shardings, min_bytes=1 << 20) == []
