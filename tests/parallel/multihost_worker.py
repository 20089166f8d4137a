"""One process of the 2-process x 4-CPU-device run in test_multihost.py (not a test itself).

  python tests/parallel/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR

Joins jax.distributed on 127.0.0.1:PORT (gloo collectives), builds the hybrid mesh (processes
along 'data' over DCN, 4 local devices along 'fsdp'), generates only this process's rows of each
global batch, trains STEPS steps with the trainer's step, saves an orbax checkpoint from every
process, and (process 0) writes the losses and final parameters to WORKDIR/result_*.npz.
"""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.config.update('jax_default_matmul_precision', 'highest')


def main(port: int, process_id: int, num_processes: int, workdir: str) -> None:
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=num_processes,
                             process_id=process_id, initialization_timeout=60)
  import numpy as np
  from jax.experimental import multihost_utils
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import multihost_common as common
  from t5like.data.pipeline import to_global_batch
  from t5like.parallel import mesh as mesh_lib
  from t5like.train import checkpoint as ckpt_lib

  assert jax.process_count() == num_processes and jax.local_device_count() == 4
  mesh_cfg = common.HOST_MESH
  mesh = mesh_lib.make_mesh(mesh_cfg)
  rows = common.GLOBAL_BATCH // num_processes
  mine = range(process_id * rows, (process_id + 1) * rows)

  def batch_fn(step):
    global_batch = to_global_batch(common.batch_rows(step, mine), mesh)
    for x in global_batch.values():         # this process's rows are the ones it generated
      starts = {s.index[0].start or 0 for s in x.addressable_shards}
      assert min(starts) == mine.start and max(starts) < mine.stop, (starts, mine)
    return global_batch

  state, losses = common.train(mesh, mesh_cfg, batch_fn)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'ckpt'), keep_best=0,
                                       async_save=False)
  checkpointer.save(common.STEPS, state, {'process_count': num_processes},
                    {'model': common.config_dict()})
  checkpointer.close()
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if process_id == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(workdir, 'result_0.npz'), losses=np.asarray(losses), **flat)
  multihost_utils.sync_global_devices('done')
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
