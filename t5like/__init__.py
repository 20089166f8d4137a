"""t5like: T5-style Transformers in JAX/Flax with the whole optimisation toolbox."""
__version__ = '0.1.0'
