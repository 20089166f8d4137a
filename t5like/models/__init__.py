"""Models: `build_model(cfg)` gives a linen module (EncoderDecoder or DecoderOnly)."""
from t5like.models.transformer import (DecoderOnly, EncoderDecoder, abstract_params, build_model,
                                       init_cache, init_params, param_count)

__all__ = ['DecoderOnly', 'EncoderDecoder', 'abstract_params', 'build_model', 'init_cache',
           'init_params', 'param_count']
