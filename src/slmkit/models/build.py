"""Build a model from a config and a state dict in slmkit's key names, with a clear error on mismatch."""

from __future__ import annotations

import contextlib

import torch

from ..config import ModelConfig
from ..errors import ModelFileError
from ..nn.rope import inv_frequencies
from .decoder import Decoder


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skeleton():
    """Modules built inside get meta tensors and skip their random initialisation (the weights come from a
    checkpoint). On the meta device torch runs ``nn.init`` through its Python reference ops, whose first use
    imports torch._dynamo and sympy: ~75 MB resident, a third of a compact SmolLM2's memory."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def check_weights(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, what: str,
                  name_of=lambda key: key) -> None:
    """A ModelFileError naming missing, unexpected and wrongly shaped tensors (by ``name_of``, e.g. the
    checkpoint's own key names) when ``state`` does not fit a model whose state dict is ``expected``."""
    missing = sorted(name_of(k) for k in set(expected) - set(state))
    unexpected = sorted(name_of(k) for k in set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {', '.join(unexpected[:3])}")
        raise ModelFileError(f"{source}: weights do not match {what}: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelFileError(f"{source}: tensor {name_of(k)} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(v.shape)}")


def build_decoder(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  source: str = "checkpoint") -> Decoder:
    with skeleton():
        model = Decoder(cfg)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    check_weights(model.state_dict(), state, source, "the architecture")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    # non-persistent buffers (RoPE tables) were created on the meta device: make them real
    model.inv_freq = inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_factor)
    model.inv_freq_local = inv_frequencies(cfg.rotary_dim, cfg.rope_local_theta)
    return model.eval()
