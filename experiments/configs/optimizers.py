"""Optimizers x schedules x precision on one small T5 and the same Shakespeare data.

  python experiments/optimizers.py --part=sweep & python experiments/optimizers.py --part=main; wait
  python experiments/optimizers.py                          # the tables and the plot (~20 min)
  python experiments/optimizers.py --config=experiments/configs/optimizers.py:smoke  # ~2 min
  ... --config.train.num_steps=300 --config.sweep.adam='(1e-3, 3e-3)' --workdir=runs/optimizers

Args:
  default  every optimizer with the cosine schedule at 2 learning rates (the sweep;
           all runs have the same 120 steps, so the best of them is the optimizer's result), then
           AdamW at its best rate with every schedule, then 'bf16' against 'f32' (loss, s/step).
           About 25 compilations dominate the cost: ~20 min in two processes
           (`--part=sweep` and `--part=main` side by side, then the default `--part=all`);
  smoke    two optimizers, two schedules, a few steps: checks the script end to end.

Learning-rate sweep (half a decade apart, bracketing the usual rate of each method for a small
Transformer with clipping at 1.0, on the high side because the runs are short; only 2 values,
because every value costs a compilation, minutes on a heavily shared 2-core CPU): sgd (momentum 0.9, decoupled decay) needs large rates;
LARS's trust coefficient (0.001) makes its rate a multiple of 1e3 times the relative update;
LAMB and Adafactor (parameter-scaled) take relative-update rates; Adam-like methods the usual 1e-3.
"""
import ml_collections

from t5like import config as config_lib


def _train(num_steps: int) -> ml_collections.ConfigDict:
  model = config_lib.get_variant('t5_tiny')
  cfg = config_lib.to_dict(config_lib.TrainConfig(model=model))
  cfg = ml_collections.ConfigDict(cfg)
  cfg.data.corpus = 'shakespeare'
  cfg.data.vocab_size = 1000            # small vocabulary: the logits stay cheap on a CPU
  cfg.data.inputs_length = 64           # span corruption: 64 inputs -> 14 targets per row
  cfg.data.batch_size = 16
  cfg.num_steps = num_steps
  cfg.optim.warmup_steps = 10
  cfg.optim.schedule = 'cosine'
  cfg.optim.end_lr_fraction = 0.1
  cfg.log_every = 10
  cfg.eval_every = 20                   # also the reduce-on-plateau cadence
  cfg.eval_batches = 4
  cfg.checkpoint_every = num_steps
  cfg.keep_checkpoints = 1
  cfg.keep_best_checkpoints = 0
  cfg.num_samples = 0
  return cfg


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  if arg == 'default':
    cfg.train = _train(120)
    cfg.sweep = ml_collections.ConfigDict({
        'sgd': (0.1, 0.3),
        'adam': (3e-3, 1e-2),
        'adamw': (1e-3, 3e-3),
        'lars': (1.0, 3.0),
        'lamb': (3e-3, 1e-2),
        'adafactor': (1e-2, 3e-2),
        'agd': (3e-3, 1e-2),
    })
    # Most informative first: the process may be stopped at the time budget (--cached_only).
    cfg.schedules = ('cosine', 'grad_stats', 'plateau', 'rsqrt', 'wsd', 'constant', 'linear',
                     'exponential')
    cfg.timing_steps = 20               # bf16 vs f32: timed steps per round, interleaved
    cfg.timing_rounds = 3
  elif arg == 'smoke':
    cfg.train = _train(20)
    cfg.train.eval_every = 10
    cfg.train.eval_batches = 1
    cfg.train.optim.warmup_steps = 2
    cfg.sweep = ml_collections.ConfigDict({'adamw': (3e-3,), 'sgd': (0.3,)})
    cfg.schedules = ('cosine', 'plateau')
    cfg.timing_steps = 3
    cfg.timing_rounds = 1
  else:
    raise ValueError(f'unknown optimizers config {arg!r}; choose one of default, smoke')
  cfg.schedule_optimizer = 'adamw'      # the optimizer every schedule is run with
  cfg.precision_lr = cfg.sweep.adamw[0] # 'bf16' vs 'f32': adamw, cosine, this learning rate
  # Settings of the schedules that are not plain OptimConfig.schedule names.
  cfg.wsd_decay_fraction = 0.2
  cfg.grad_stats = ml_collections.ConfigDict(dict(base_schedule='constant', grad_lr_scaling='cv',
                                                  grad_lr_strength=1.0, spike_k=3.0,
                                                  spike_min_steps=20))
  cfg.plateau = ml_collections.ConfigDict(dict(base_schedule='constant', plateau_factor=0.5,
                                               plateau_patience=1, plateau_rtol=0.01))
  return cfg
