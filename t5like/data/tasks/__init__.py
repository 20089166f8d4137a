"""Text-to-text tasks: sources, the registry of tasks and mixtures, and their metrics."""
from t5like.data.tasks.metrics import MetricError
from t5like.data.tasks.registry import Mixture, Registry, Task, builtin_tasks, get_task
from t5like.data.tasks.sources import SPLITS, Example, TaskError

__all__ = ['Example', 'MetricError', 'Mixture', 'Registry', 'SPLITS', 'Task', 'TaskError',
           'builtin_tasks', 'get_task']
