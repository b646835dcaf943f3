"""Build a model from a config and a state dict in slmkit's key names, with a clear error on mismatch."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import ModelFileError
from ..nn.rope import inv_frequencies
from .decoder import Decoder


def build_decoder(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  source: str = "checkpoint") -> Decoder:
    with torch.device("meta"):
        model = Decoder(cfg)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {', '.join(unexpected[:3])}")
        raise ModelFileError(f"{source}: weights do not match the architecture: {'; '.join(parts)}")
    for k, v in model.state_dict().items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelFileError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    # non-persistent buffers (RoPE tables) were created on the meta device: make them real
    model.inv_freq = inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_factor)
    model.inv_freq_local = inv_frequencies(cfg.rotary_dim, cfg.rope_local_theta)
    return model.eval()
