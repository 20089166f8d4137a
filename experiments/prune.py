"""Pruning experiment on the Shakespeare model: every method at 30/50/70/90%, before and after
fine-tuning, plus dynamic FFN top-k (quality vs decode speed).

  python experiments/prune.py --workdir=/tmp/prune_run            # CPU, small model
  python experiments/prune.py --workdir=... --train_steps=300 --finetune_steps=40

1. Trains a small T5 on Shakespeare (span corruption) with the project's trainer (`loop.train`),
   or reuses the checkpoint already in --workdir.
2. For each method (magnitude, 2:4 N:M, structured L2, Taylor, greedy) and sparsity, computes the
   masks on the trained weights (calibration: --calib_batches training batches), evaluates the
   validation loss, fine-tunes --finetune_steps steps with the masks held in the optimizer state
   (`gradual.keep_masks`, the trainer's `train_step`), evaluates again. 'gradual' prunes during the
   fine-tune instead (Zhu & Gupta schedule from 0 to the target over the first 3/4 of it).
3. Dynamic FFN top-k at k = d_ff/2, /4, /8: validation loss.
Writes experiments/results/prune.json and prune.png (sparsity vs validation loss per method,
before and after fine-tuning). Speeds of the shrunk models: scripts/bench_prune.py.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from t5like import config as config_lib
from t5like import precision
from t5like.compress import dynamic, gradual, greedy, prune
from t5like.data import pipeline
from t5like.models import build_model
from t5like.optim.optimizers import make_optimizer
from t5like.train import checkpoint as ckpt_lib
from t5like.train import loop, step as step_lib
from t5like.train.state import TrainState

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
SPARSITIES = (0.3, 0.5, 0.7, 0.9)
METHODS = ('magnitude', 'nm', 'structured', 'taylor', 'greedy', 'gradual')


def experiment_config(train_steps: int) -> config_lib.TrainConfig:
  """The small Shakespeare model this experiment prunes (8 heads so that head counts can meet
  30..90%; 2+2 layers; 64-token inputs)."""
  model = config_lib.get_variant('t5_small', d_model=128, num_heads=8, head_dim=16, d_ff=512,
                                 num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0
                                 ).replace(name='t5_shakespeare_prune')
  data = config_lib.DataConfig(objective='span_corruption', inputs_length=64, batch_size=16,
                               vocab_size=2000)
  optim = config_lib.OptimConfig(learning_rate=3e-3, warmup_steps=20)
  return config_lib.TrainConfig(model=model, data=data, optim=optim, num_steps=train_steps,
                                eval_every=train_steps, eval_batches=8,
                                checkpoint_every=train_steps, log_every=50, num_samples=0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default='/tmp/t5like_prune')
  ap.add_argument('--train_steps', type=int, default=300)
  ap.add_argument('--finetune_steps', type=int, default=40)
  ap.add_argument('--finetune_lr', type=float, default=1e-3)
  ap.add_argument('--calib_batches', type=int, default=2)
  ap.add_argument('--eval_batches', type=int, default=8)
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--out', default=os.path.join(RESULTS, 'prune'))
  args = ap.parse_args(argv)
  t_start = time.time()

  config = experiment_config(args.train_steps)
  ckpt_dir = os.path.join(args.workdir, loop.CHECKPOINT_DIR)
  if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    summary = loop.train(config, args.workdir, devices=jax.devices()[:1])
    print(f"trained: validation loss {summary.get('final_val_loss')}")
  params, saved, _ = ckpt_lib.restore_params(args.workdir)
  config = config_lib.from_dict(config_lib.TrainConfig, saved)
  mcfg = config.model
  model = build_model(mcfg)
  train_iter, eval_batches_fn, _ = pipeline.make_datasets(config.data, mcfg.arch, args.workdir,
                                                          seed=config.seed + 1)
  val = [b for _, b in zip(range(args.eval_batches), eval_batches_fn())]
  calib = [next(train_iter) for _ in range(args.calib_batches)]
  ft_batches = [next(train_iter) for _ in range(args.finetune_steps)]
  loss_fn = prune.model_loss_fn(mcfg)

  eval_sums = jax.jit(functools.partial(step_lib.eval_step, model=model))

  def val_loss(p):
    s = [eval_sums(p, b) for b in val]
    return float(sum(x['loss_sum'] for x in s) / sum(x['weight_sum'] for x in s))

  ft_optim = config_lib.OptimConfig(learning_rate=args.finetune_lr, warmup_steps=0,
                                    schedule='constant')

  base_tx = make_optimizer(ft_optim, None, args.finetune_steps)
  steps = {}

  def finetune(p, tx, init_tx=None):
    """Fine-tunes p; `tx` is the jitted update, `init_tx` (same state structure) builds the state.
    One compile for every fixed-mask run: the masks are state, not closure."""
    init_tx = init_tx or tx
    state = TrainState(step=jnp.zeros([], jnp.int32), params=p, opt_state=init_tx.init(p),
                       rng=jax.random.PRNGKey(0),
                       loss_scale=precision.make_loss_scale(precision.get_policy(mcfg.precision)))
    if id(tx) not in steps:
      steps[id(tx)] = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
    for b in ft_batches:
      state, _ = steps[id(tx)](state, b)
    return state.params, state.opt_state

  dense_loss = val_loss(params)
  print(f'dense validation loss {dense_loss:.4f}')
  masked_tx = gradual.keep_masks(base_tx, prune.ones_masks(params))
  # The dense model fine-tuned the same number of steps: the reference for "after".
  dense_ft, _ = finetune(params, masked_tx)
  results = {'model': {k: getattr(mcfg, k) for k in ('d_model', 'num_heads', 'head_dim', 'd_ff',
                                                     'num_encoder_layers', 'num_decoder_layers',
                                                     'vocab_size')},
             'train_steps': args.train_steps, 'finetune_steps': args.finetune_steps,
             'calib_batches': args.calib_batches, 'eval_batches': len(val),
             'dense_val_loss': dense_loss, 'dense_finetuned_val_loss': val_loss(dense_ft),
             'runs': [], 'dynamic_ffn_topk': []}
  names = prune.prunable(params)
  methods = args.methods.split(',')
  greedy_masks = {}
  if 'greedy' in methods:
    t = time.time()
    gcfg = prune.PruneConfig(method='greedy')
    um, history = greedy.greedy_unit_masks(params, loss_fn, calib[:1], SPARSITIES, gcfg)
    greedy_masks = {s: prune.expand_unit_masks(params, u) for s, u in zip(SPARSITIES, um)}
    results['greedy_s'] = round(time.time() - t, 1)
    results['greedy_first_removals'] = [h['unit'] for h in history[:5]]
  grad_fn = jax.jit(jax.grad(loss_fn))
  for method in methods:
    for s in SPARSITIES:
      t = time.time()
      if method == 'gradual':
        pc = prune.PruneConfig(method='magnitude', sparsity=s, begin_step=0,
                               end_step=(3 * args.finetune_steps) // 4,
                               update_every=max(1, args.finetune_steps // 8))
        tuned, opt_state = finetune(params, gradual.prune_during_training(base_tx, pc))
        masks, before = gradual.masks_of(opt_state), None
      else:
        if method == 'nm':
          if s != 0.5:
            continue
          masks = prune.compute_masks(params, prune.PruneConfig(nm='2:4'))
        elif method == 'greedy':
          masks = greedy_masks[s]
        elif method == 'taylor':
          pc = prune.PruneConfig(method='taylor', sparsity=s)
          masks = prune.unstructured_masks(
              params, prune.gradient_scores(params, loss_fn, calib, pc, grad_fn), s, pc)
        else:
          masks = prune.compute_masks(params, prune.PruneConfig(method=method, sparsity=s,
                                                                norm='l2'))
        pruned = prune.apply_masks(params, masks)
        before = val_loss(pruned)
        tuned, _ = finetune(pruned, masked_tx, gradual.keep_masks(base_tx, masks))
      row = {'method': method, 'target_sparsity': s,
             'sparsity': round(prune.sparsity(masks, names)['total'], 4),
             'val_loss_before_ft': before, 'val_loss_after_ft': val_loss(tuned),
             'seconds': round(time.time() - t, 1)}
      results['runs'].append(row)
      print(json.dumps(row), flush=True)

  for k in (mcfg.d_ff // 2, mcfg.d_ff // 4, mcfg.d_ff // 8):
    @jax.jit
    def topk_sums(p, b, k=k):
      with dynamic.ffn_topk(k):
        return step_lib.eval_step(p, b, model=model)
    s = [topk_sums(params, b) for b in val]
    row = {'k': k, 'fraction_active': k / mcfg.d_ff,
           'val_loss': float(sum(x['loss_sum'] for x in s) / sum(x['weight_sum'] for x in s))}
    results['dynamic_ffn_topk'].append(row)
    print(json.dumps(row), flush=True)

  results['wall_s'] = round(time.time() - t_start, 1)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(results, f, indent=1)
  plot(results, args.out + '.png')
  print(f'wrote {args.out}.json and {args.out}.png')


def plot(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, key, title in ((axes[0], 'val_loss_before_ft', 'one-shot (before fine-tuning)'),
                         (axes[1], 'val_loss_after_ft',
                          f"after {results['finetune_steps']} fine-tuning steps")):
    for method in dict.fromkeys(r['method'] for r in results['runs']):
      rows = [r for r in results['runs'] if r['method'] == method and r[key] is not None]
      if rows:
        ax.plot([r['sparsity'] for r in rows], [r[key] for r in rows], 'o-', label=method)
    ref = results['dense_val_loss'] if key == 'val_loss_before_ft' else \
        results['dense_finetuned_val_loss']
    ax.axhline(ref, color='k', ls='--', lw=1, label='dense')
    ax.set_xlabel('sparsity of the layer kernels')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('validation loss (span corruption)')
  axes[0].set_yscale('log')
  axes[1].legend(fontsize=8)
  fig.suptitle('Pruning the Shakespeare T5 (d_model {d_model}, {num_heads} heads, d_ff {d_ff})'
               .format(**results['model']))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
