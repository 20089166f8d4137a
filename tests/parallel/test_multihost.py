"""2 processes x 4 CPU devices through jax.distributed equal 1 process x 8 devices; their orbax
checkpoint restores in one process onto a different mesh."""
import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_common as common  # noqa: E402

from t5like.data.pipeline import to_global_batch  # noqa: E402
from t5like.config import MeshConfig  # noqa: E402
from t5like.parallel import mesh as mesh_lib  # noqa: E402
from t5like.train import checkpoint as ckpt_lib, state as state_lib  # noqa: E402

TIME_LIMIT_S = 240   # the workers are killed past this; they take ~30-60 s on 2 idle cores
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


@pytest.mark.multiprocess
def test_two_processes_match_one_and_checkpoint_reshards(tmp_path):
  port = portpicker.pick_unused_port()
  root = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  logs = [open(tmp_path / f'worker_{i}.log', 'w+') for i in range(2)]
  procs = []
  try:
    for i in range(2):
      procs.append(subprocess.Popen([sys.executable, WORKER, str(port), str(i), '2',
                                     str(tmp_path)], env=env, stdout=logs[i],
                                    stderr=subprocess.STDOUT, cwd=root))
    # Meanwhile, the single-process reference on this process's 8 devices.
    mesh = mesh_lib.make_mesh(common.SINGLE_MESH)
    all_rows = range(common.GLOBAL_BATCH)
    ref_state, ref_losses = common.train(
        mesh, common.SINGLE_MESH, lambda s: to_global_batch(common.batch_rows(s, all_rows), mesh))
    deadline = time.monotonic() + TIME_LIMIT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read()[-3000:])
    assert [p.returncode for p in procs] == [0, 0], outputs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()

  result = np.load(tmp_path / 'result_0.npz')
  np.testing.assert_allclose(result['losses'], ref_losses, rtol=1e-5)
  ref_flat = {jax.tree_util.keystr(k): np.asarray(v)
              for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(ref_state.params))}
  for name, ref in ref_flat.items():
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    assert float(np.max(np.abs(result[name] - ref))) <= 1e-5 * scale, name

  # Restore what both processes wrote, in this one process, on another mesh: fsdp 2 x tensor 4.
  other_cfg = MeshConfig(data=1, fsdp=2, tensor=4, rules='fsdp_tp')
  other = mesh_lib.make_mesh(other_cfg)
  abstract, shardings = state_lib.abstract_train_state(common.CFG, common.make_tx(), other,
                                                       mesh_lib.get_rules(other_cfg.rules))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), keep_best=0, async_save=False)
  restored, data_state, config = checkpointer.restore(common.STEPS, abstract)
  checkpointer.close()
  assert data_state == {'process_count': 2} and config['model']['name'] == 't5_tiny'
  assert int(restored.step) == common.STEPS
  wi = restored.params['encoder']['stack']['layers']['layer']['mlp']['wi']['kernel']
  assert wi.sharding.mesh.shape == other.shape
  assert wi.sharding.shard_shape(wi.shape) == (wi.shape[0], wi.shape[1] // 2, wi.shape[2] // 4)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(restored.params),
                          jax.tree.leaves(shardings.params)):
    assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), result[jax.tree_util.keystr(path)])
