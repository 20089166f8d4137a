"""Checkpoints: orbax `CheckpointManager` with three items per step.

  <directory>/<step>/state    the TrainState (orbax StandardSave: sharded arrays, tensorstore)
  <directory>/<step>/data     the data iterator's position (JsonSave)
  <directory>/<step>/config   the resolved TrainConfig as a dict (JsonSave)

Saves are asynchronous (the arrays are copied off the state before `save` returns, so the next
step may donate it) and atomic: orbax writes into a temporary folder and renames it when complete,
so a kill mid-save leaves the previous checkpoints intact and the half-written one invisible.
Preserved: the last `keep` steps, plus the `keep_best` steps with the lowest validation loss among
those saved with one.

Restoring checks compatibility before touching arrays: a checkpoint whose saved model config
differs from the run's is a `CheckpointError` naming the checkpoint and the differing keys; a
checkpoint that cannot be read (corrupt, incomplete, other shapes) is a `CheckpointError` naming
it. Nothing is ever written over it: the run stops before its first step.

`restore_params(workdir, step)` is the one way to read a trained model back out of a workdir
(bundles, fine-tuning, experiments): the params alone, as host arrays, whatever mesh saved them.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as ocm

from t5like import paths

VAL_METRIC = 'val_loss'
ITEMS = ('state', 'data', 'config')
CHECKPOINT_DIR = 'checkpoints'   # a training workdir's checkpoint folder


class _NoMetricsFilter(logging.Filter):
  """Drops orbax's warning for saves without a validation loss (most saves, by design)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


def _quiet_orbax_metrics_warning() -> None:
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _NoMetricsFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_NoMetricsFilter())


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used by this run; the message names it and how to proceed."""


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
  """{dotted key: value} of a nested config dict (tuples as lists, as JSON gives them back)."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in traverse_util.flatten_dict(dict(d), sep='.').items()}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       sections: tuple[str, ...] = ('model',)) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved, current)} for the keys under `sections` whose values differ."""
  a, b = _flatten(saved), _flatten(current)
  keys = sorted(k for k in set(a) | set(b) if k.split('.', 1)[0] in sections)
  return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


class Checkpointer:
  """The run's checkpoint folder (see the module docstring)."""

  def __init__(self, directory: str, *, keep: int = 3, keep_best: int = 1,
               async_save: bool = True, best_metric: str = VAL_METRIC, best_mode: str = 'min'):
    if keep < 1:
      raise CheckpointError(f'keep_checkpoints must be >= 1, got {keep}')
    if best_mode not in ('min', 'max'):
      raise CheckpointError(f"best_mode={best_mode!r} is not valid; choose 'min' or 'max'")
    # The best checkpoints are those with the lowest (or highest) `best_metric` among the saves
    # that carry metrics (each evaluation's: the validation loss, and task metrics if any).
    metric = lambda m: m[best_metric]
    self.directory = paths.as_str(paths.resolve(directory))   # a gs:// URI stays one
    _quiet_orbax_metrics_warning()
    policies = [ocm.LatestN(n=keep)]
    if keep_best:
      policies.append(ocm.BestN(get_metric_fn=metric, reverse=best_mode == 'min',
                                n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        best_fn=metric, best_mode=best_mode,  # metrics persist across restarts
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def path(self, step: int) -> str:
    return paths.as_str(paths.resolve(self.directory) / str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: Mapping[str, Any], config: Mapping[str, Any],
           val_loss: float | None = None, metrics: Mapping[str, float] | None = None) -> None:
    """Starts an async save of step `step`; `wait()` blocks until it is on disk. `metrics`
    (with `val_loss`) are what the best checkpoints are chosen by."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(dict(data_state)),
                              config=ocp.args.JsonSave(dict(config)))
    saved = None if val_loss is None else {
        VAL_METRIC: float(val_loss), **{k: float(v) for k, v in (metrics or {}).items()}}
    self.manager.save(step, args=args, metrics=saved, force=True)

  def read_config(self, step: int) -> dict[str, Any]:
    """The config saved with `step` (a CheckpointError if it cannot be read)."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return dict(out['config'])
    except Exception as e:  # orbax / tensorstore / json errors all mean "unreadable"
      raise CheckpointError(f'checkpoint {self.path(step)} has no readable config ({type(e).__name__}: '
                            f'{e}); it is corrupt or was not written by t5like. It was left '
                            'untouched: move it away to resume from an earlier step, or use '
                            'another --workdir') from e

  def check_compatible(self, step: int, config: Mapping[str, Any]) -> None:
    """Raises if the model config saved with `step` differs from `config`'s."""
    diff = config_differences(self.read_config(step), config)
    if diff:
      lines = ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, a, b in
                        ((k, *v) for k, v in diff.items()))
      raise CheckpointError(f'checkpoint {self.path(step)} was saved by a different model '
                            f'({lines}). Resume with the config it was saved with (see '
                            f'{self.path(step)}/config), or use another --workdir; the checkpoint '
                            'was left untouched')

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state placed like `abstract_state`'s shardings, data-iterator state, saved config)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    try:
      out = self.manager.restore(step, args=args)
    except Exception as e:
      raise CheckpointError(f'checkpoint {self.path(step)} cannot be restored into this run '
                            f'({type(e).__name__}: {str(e)[:500]}); it is corrupt, incomplete or '
                            'holds other shapes. It was left untouched: move it away to resume '
                            'from an earlier step, or use another --workdir') from e
    return out['state'], dict(out['data']), dict(out['config'])

  def best_step(self) -> int | None:
    """The preserved step with the lowest validation loss (None if none was saved with one)."""
    return self.manager.best_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(workdir: str, step: int | str | None = None) -> tuple[Any, dict[str, Any], int]:
  """(params as host numpy arrays, the config saved with them, step) of a training workdir.

  `step`: None or 'latest' (the latest checkpoint), 'best' (lowest validation loss) or a step
  number. Only the parameters are restored, onto the host CPU, whatever mesh the run was saved
  from; a missing or unreadable checkpoint is a CheckpointError naming it.
  """
  directory = paths.as_str(paths.resolve(workdir) / CHECKPOINT_DIR)
  if not paths.resolve(directory).is_dir():
    raise CheckpointError(f'{workdir} has no {CHECKPOINT_DIR}/ folder; is it a t5like training '
                          'workdir?')
  ckpt = Checkpointer(directory, async_save=False, keep_best=0)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise CheckpointError(f'{directory} holds no checkpoint; train first or point at another '
                            'workdir')
    if step in (None, 'latest'):
      step = steps[-1]
    elif step == 'best':
      step = ckpt.best_step()
      if step is None:
        raise CheckpointError(f'{directory} has no checkpoint saved with a validation loss; use '
                              "step='latest'")
    else:
      try:
        step = int(step)
      except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint step {step!r} is not valid; use 'latest', 'best' or a "
                              'step number') from None
      if step not in steps:
        raise CheckpointError(f'{directory} has no step {step}; it has {steps}')
    config = ckpt.read_config(step)
    try:
      # The saved tree's shapes and dtypes, read without restoring (and without the run's mesh).
      meta = ocp.StandardCheckpointer().metadata(paths.as_str(paths.resolve(ckpt.path(step))
                                                              / 'state'))
      meta = getattr(meta, 'item_metadata', meta)
      meta = getattr(meta, 'tree', meta)
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            dict(meta), is_leaf=lambda x: hasattr(x, 'shape'))
      out = ckpt.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
    except Exception as e:  # orbax / tensorstore errors all mean "unreadable"
      raise CheckpointError(f'checkpoint {ckpt.path(step)} cannot be read ({type(e).__name__}: '
                            f'{str(e)[:300]}); it is corrupt or incomplete') from e
    state = out['state']
    params = state['params'] if isinstance(state, Mapping) else state.params
    return jax.tree.map(np.asarray, params), config, step
  finally:
    ckpt.close()
