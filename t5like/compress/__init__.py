"""Compression transforms on parameter pytrees: pruning, sharing, distillation, quantisation."""
