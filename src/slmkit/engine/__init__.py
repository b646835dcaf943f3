"""Inference: KV cache, sampling, prefill/decode loop, streaming."""
