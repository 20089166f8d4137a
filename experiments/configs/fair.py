"""Fair comparisons: optimisers with equal tuning budgets, schedules, augmentation, precision.

  nice -n 19 python experiments/fair_optimizers.py                      # everything (~50 min here)
  nice -n 19 python experiments/fair_optimizers.py --config=experiments/configs/fair.py:smoke

Args:
  default  t5_tiny, Shakespeare span corruption, batch 16 x 64, 80 steps; every optimiser on a
           log-spaced grid of 5 learning rates (half a decade apart) centred on its literature
           value, widened by a point while the best is at an edge; folio_modernize runs 150 steps.
  smoke    the same phases at a few steps and a 3-point grid (checks the script end to end).

Centre of each grid: the rate usually published for the method: SGD with momentum 0.1;
Adam / AdamW 1e-3; LARS 1.0 with trust coefficient 1e-3 (the rate multiplies a relative update of
1e-3); LAMB 2e-3 (large-batch BERT training used 1e-3 .. 5e-3); Adafactor 1e-2 (T5's pretraining
peak with parameter scaling); AGD 1e-3 (Adam's rates).
"""
import ml_collections

from t5like import config as config_lib

LITERATURE_LR = {'sgd': 0.1, 'adam': 1e-3, 'adamw': 1e-3, 'lars': 1.0, 'lamb': 2e-3,
                 'adafactor': 1e-2, 'agd': 1e-3}


def _train(num_steps: int) -> ml_collections.ConfigDict:
  model = config_lib.get_variant('t5_tiny')
  cfg = ml_collections.ConfigDict(config_lib.to_dict(config_lib.TrainConfig(model=model)))
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
  cfg.eval_batches = 4                  # validation batches during training (the final one: all)
  return cfg


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.optimizers = tuple(LITERATURE_LR)
  cfg.literature_lr = ml_collections.ConfigDict(LITERATURE_LR)
  cfg.grid_step = 10 ** 0.5             # neighbouring learning rates differ by half a decade
  cfg.max_widen = 3                     # extra points per side while the best is at an edge
  cfg.test_fraction = 0.5               # of the validation plays, held out as the test split
  cfg.seeds = (0, 1)
  cfg.schedules = ('constant', 'linear', 'cosine', 'exponential', 'rsqrt', 'wsd', 'plateau',
                   'grad_stats')
  cfg.wsd_decay_fraction = 0.2
  cfg.plateau = ml_collections.ConfigDict(dict(plateau_factor=0.5, plateau_patience=1,
                                               plateau_rtol=0.01))
  cfg.grad_stats = ml_collections.ConfigDict(dict(grad_lr_scaling='cv', grad_lr_strength=1.0,
                                                  spike_k=3.0, spike_min_steps=20))
  cfg.folio_optimizers = 3              # the best this many optimisers also train folio_modernize
  cfg.augmentations = ml_collections.ConfigDict({
      'none': {},
      'mask': {'mask_prob': 0.15},
      'reorder': {'reorder_prob': 0.5},
      'syntax': {'clause_swap_prob': 0.3, 'swap_prob': 0.05, 'drop_function_word_prob': 0.1},
      'all': {'mask_prob': 0.15, 'reorder_prob': 0.5, 'clause_swap_prob': 0.3, 'swap_prob': 0.05,
              'drop_function_word_prob': 0.1},
  })
  cfg.precisions = ('f32', 'bf16', 'pure_bf16', 'fp16')
  cfg.timing_steps = 10                 # precision step time: steps per round, policies alternate
  cfg.timing_rounds = 3
  if arg == 'default':
    cfg.train = _train(80)
    cfg.grid_points = 5
    cfg.folio_steps = 150
    cfg.folio_eval_examples = 300       # test examples decoded for chrF (with bootstrap CIs)
  elif arg == 'smoke':
    cfg.train = _train(12)
    cfg.train.eval_every = 6
    cfg.train.eval_batches = 1
    cfg.train.optim.warmup_steps = 2
    cfg.optimizers = ('adamw', 'sgd')
    cfg.grid_points = 3
    cfg.max_widen = 1
    cfg.schedules = ('cosine', 'wsd', 'plateau', 'grad_stats')
    cfg.grad_stats.spike_min_steps = 4
    cfg.folio_optimizers = 1
    cfg.augmentations = ml_collections.ConfigDict({'none': {}, 'mask': {'mask_prob': 0.15}})
    cfg.precisions = ('f32', 'fp16')
    cfg.folio_steps = 12
    cfg.folio_eval_examples = 16
    cfg.timing_steps = 2
    cfg.timing_rounds = 1
  else:
    raise ValueError(f'unknown fair config {arg!r}; choose one of default, smoke')
  cfg.folio = ml_collections.ConfigDict(dict(inputs_length=48, targets_length=48,
                                             warmup_steps=20 if arg == 'default' else 2))
  return cfg
