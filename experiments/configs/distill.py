"""The distillation study's teacher and student (experiments/distill.py); experiments/quantize.py
quantises the same teacher.

  python experiments/distill.py --workdir=runs/distill --teacher_steps=600 --student_steps=300
  python experiments/distill.py --teacher=experiments/configs/distill.py:teacher \
      --teacher.optim.learning_rate=1e-3

Args:
  teacher  t5_tiny widened to d_model 128, 4 heads of 32, d_ff 512, 3+3 layers, on Shakespeare
           (span corruption, 2k pieces, unpacked 64-token inputs for sequence-level distillation);
  student  a quarter of its size (d_model 64, 4 heads of 16, d_ff 256, 2+2 layers), seed 1.
The scripts set num_steps (and the student's evaluation and checkpoint intervals) from their
--teacher_steps / --student_steps flags.
"""
import ml_collections

from t5like import config as config_lib

DATA = config_lib.DataConfig(corpus='shakespeare', vocab_size=2000, inputs_length=64,
                             batch_size=16, pack=False)


def get_config(arg: str = 'teacher') -> ml_collections.ConfigDict:
  if arg == 'teacher':
    model = config_lib.get_variant('t5_tiny', d_model=128, num_heads=4, head_dim=32, d_ff=512,
                                   num_encoder_layers=3, num_decoder_layers=3)
    cfg = config_lib.TrainConfig(
        model=model, data=DATA, log_every=50, eval_every=100, eval_batches=8,
        checkpoint_every=100, num_samples=0,
        optim=config_lib.OptimConfig(name='adamw', learning_rate=3e-3, warmup_steps=50))
  elif arg == 'student':
    model = config_lib.get_variant('t5_tiny', d_model=64, num_heads=4, head_dim=16, d_ff=256,
                                   num_encoder_layers=2, num_decoder_layers=2)
    cfg = config_lib.TrainConfig(
        model=model, data=DATA, log_every=50, eval_batches=8, num_samples=0, seed=1,
        optim=config_lib.OptimConfig(name='adamw', learning_rate=3e-3, warmup_steps=30))
  else:
    raise ValueError(f"unknown config argument {arg!r}; use 'teacher' or 'student'")
  return ml_collections.ConfigDict(config_lib.to_dict(cfg))
