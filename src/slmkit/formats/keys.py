"""Checkpoint key mappings: HF names and GGUF names to slmkit's module names, and back.

slmkit's names are the same for every family (``layers.N.attn.q``, ``layers.N.ffn_norm``...);
each family only differs in what its checkpoints call them.
"""

from __future__ import annotations

import re

# (HF fragment, slmkit fragment), applied in order to "model.layers.N.<rest>" style keys
_COMMON = [
    ("model.embed_tokens.", "embed."),
    ("model.norm.", "norm."),
    ("lm_head.", "lm_head."),
    ("self_attn.q_proj.", "attn.q."),
    ("self_attn.k_proj.", "attn.k."),
    ("self_attn.v_proj.", "attn.v."),
    ("self_attn.o_proj.", "attn.o."),
    ("self_attn.q_norm.", "attn.q_norm."),
    ("self_attn.k_norm.", "attn.k_norm."),
    ("mlp.gate_proj.", "mlp.gate."),
    ("mlp.up_proj.", "mlp.up."),
    ("mlp.down_proj.", "mlp.down."),
    ("input_layernorm.", "attn_norm."),
    ("model.layers.", "layers."),
]
HF_KEYS: dict[str, list[tuple[str, str]]] = {
    "llama": _COMMON + [("post_attention_layernorm.", "ffn_norm.")],
    "qwen2": _COMMON + [("post_attention_layernorm.", "ffn_norm.")],
    "gemma3_text": _COMMON + [
        ("post_attention_layernorm.", "post_attn_norm."),
        ("pre_feedforward_layernorm.", "ffn_norm."),
        ("post_feedforward_layernorm.", "post_ffn_norm."),
    ],
    "phi": [
        ("model.final_layernorm.", "norm."),
        ("self_attn.dense.", "attn.o."),
        ("mlp.fc1.", "mlp.up."),
        ("mlp.fc2.", "mlp.down."),
    ] + _COMMON,
}


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        if src in key:
            key = key.replace(src, dst)
    return key


def hf_to_slm(key: str, family: str) -> str:
    key = key.replace("model.language_model.", "model.").replace("language_model.", "")
    return _rename(key, HF_KEYS[family])


def slm_to_hf(key: str, family: str) -> str:
    pairs = [(dst, src) for src, dst in HF_KEYS[family]]
    # "layers." must become "model.layers." last, and the top-level names only at the start
    top = {"embed.": "model.embed_tokens.", "norm.": "model.final_layernorm." if family == "phi" else "model.norm.",
           "lm_head.": "lm_head."}
    for prefix, hf_prefix in top.items():
        if key.startswith(prefix):
            return hf_prefix + key[len(prefix):]
    inner = [p for p in pairs if p[0] not in ("embed.", "norm.", "lm_head.", "layers.")]
    return "model." + _rename(key, inner)


_GGUF_LAYER = {
    "attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
    "attn_output": "attn.o", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm", "ffn_norm": "ffn_norm", "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up", "ffn_down": "mlp.down", "post_ffw_norm": "post_ffn_norm",
}
_GGUF_TOP = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_slm(name: str) -> str | None:
    """slmkit key for a GGUF tensor name, or None if slmkit has no use for it (e.g. ``rope_freqs``)."""
    m = _BLOCK.match(name)
    if m:
        layer, part, kind = m.groups()
        if part == "attn_qkv":
            return f"layers.{layer}.attn.qkv.{kind}"  # split by the loader
        mapped = _GGUF_LAYER.get(part)
        return None if mapped is None else f"layers.{layer}.{mapped}.{kind}"
    stem, _, kind = name.rpartition(".")
    mapped = _GGUF_TOP.get(stem)
    return None if mapped is None else f"{mapped}.{kind}"


_SLM_LAYER = {slm: gguf for gguf, slm in _GGUF_LAYER.items()}
_SLM_TOP = {slm: gguf for gguf, slm in _GGUF_TOP.items()}


def slm_to_gguf(key: str) -> str | None:
    """The GGUF tensor name of an slmkit key (``layers.3.attn.q.weight`` -> ``blk.3.attn_q.weight``), the inverse
    of :func:`gguf_to_slm`; None for a key GGUF has no name for."""
    stem, _, kind = key.rpartition(".")
    if stem.startswith("layers."):
        _, layer, part = stem.split(".", 2)
        mapped = _SLM_LAYER.get(part)
        return None if mapped is None else f"blk.{layer}.{mapped}.{kind}"
    mapped = _SLM_TOP.get(stem)
    return None if mapped is None else f"{mapped}.{kind}"
