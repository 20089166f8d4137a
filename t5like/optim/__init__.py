"""Optimizers, learning-rate schedules and adaptive scaling (optax-based).

Public entry points: `make_optimizer`, `make_schedule`, `observe_validation`,
`optimizer_metrics`, `decay_mask`, and `agd.agd`.
"""
from t5like.optim.adaptive import (grad_norm_control, observe_validation, optimizer_metrics,
                                   plateau_scale)
from t5like.optim.agd import agd as agd_optimizer
from t5like.optim.agd import scale_by_agd
from t5like.optim.optimizers import decay_mask, make_optimizer, param_path
from t5like.optim.schedules import make_schedule

__all__ = ['agd_optimizer', 'decay_mask', 'grad_norm_control', 'make_optimizer', 'make_schedule',
           'observe_validation', 'optimizer_metrics', 'param_path', 'plateau_scale',
           'scale_by_agd']
