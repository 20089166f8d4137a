"""Inference: KV-cache decoding, the batched engine, export."""
