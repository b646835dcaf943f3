"""ModelConfig: one dataclass for every decoder architecture slmkit runs.

Behaviour is decided by the flags below, never by a model's name. ``family`` only selects the
checkpoint key mapping (HF ``model_type``) used when reading and writing files.
Built from an HF ``config.json`` (:meth:`ModelConfig.from_hf`), from GGUF metadata
(:meth:`ModelConfig.from_gguf`) or from a named preset (:meth:`ModelConfig.from_preset`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import UnsupportedError

# HF model_type values whose checkpoints we can map
HF_FAMILIES = ("llama", "phi", "qwen2", "gemma3_text")


@dataclass
class ModelConfig:
    family: str = "llama"  # checkpoint key layout: llama | phi | qwen2 | gemma3_text
    vocab_size: int = 32000
    hidden_size: int = 2048
    n_layers: int = 22
    n_heads: int = 32
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 -> hidden_size // n_heads
    intermediate_size: int = 5632
    max_position_embeddings: int = 2048

    # normalisation
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm with bias (phi)
    norm_unit_offset: bool = False  # RMSNorm applied as x_hat * (1 + w), weight init 0 (gemma)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (gemma3)
    parallel_residual: bool = False  # x + attn(LN x) + mlp(LN x) with one shared norm (phi)

    # attention
    qkv_bias: bool = False
    attn_out_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (gemma3)
    query_scale: float = 0.0  # 0 -> head_dim ** -0.5
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0 -> head_dim; phi rotates only the first dims of each head
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling: positions divided by this factor
    sliding_window: int = 0  # 0 -> no sliding-window layers
    layer_types: list[str] = field(default_factory=list)  # per layer: full_attention | sliding_attention
    rope_local_theta: float = 0.0  # RoPE base of sliding-window layers (0 -> rope_theta)

    # MLP
    mlp: str = "gated"  # gated: down(act(gate x) * up x) | plain: down(act(up x))
    activation: str = "silu"  # silu | gelu_tanh | gelu
    mlp_bias: bool = False

    # embeddings and head
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (gemma)
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False

    # special tokens as the checkpoint states them
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.n_heads
        if not self.rotary_dim:
            self.rotary_dim = self.head_dim
        if not self.query_scale:
            self.query_scale = self.head_dim ** -0.5
        if not self.rope_local_theta:
            self.rope_local_theta = self.rope_theta
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.n_layers
        if len(self.layer_types) != self.n_layers:
            raise UnsupportedError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name, value, allowed in (
            ("norm", self.norm, ("rmsnorm", "layernorm")),
            ("mlp", self.mlp, ("gated", "plain")),
            ("activation", self.activation, ("silu", "gelu_tanh", "gelu")),
            ("family", self.family, HF_FAMILIES),
        ):
            if value not in allowed:
                raise UnsupportedError(f"config {name}={value!r} is not supported (choose from {', '.join(allowed)})")

    # ----------------------------------------------------------------- views
    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window > 0 and self.layer_types[layer] == "sliding_attention"

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    def num_parameters(self) -> int:
        """Parameter count of the architecture (a tied table counted once), whatever the storage format."""
        d, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        norm = d * (2 if self.norm_bias else 1)
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.attn_out_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        n_mats = 3 if self.mlp == "gated" else 2
        mlp = n_mats * d * i + ((n_mats - 1) * i + d if self.mlp_bias else 0)
        norms = norm * (1 + (0 if self.parallel_residual else 1) + (2 if self.sandwich_norm else 0))
        head = 0 if self.tie_word_embeddings else self.vocab_size * d + (self.vocab_size if self.lm_head_bias else 0)
        return self.vocab_size * d + self.n_layers * (attn + mlp + norms) + norm + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise UnsupportedError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    # ---------------------------------------------------------- HF config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: take the text tower
            hf, model_type = {**hf["text_config"], "model_type": "gemma3_text"}, "gemma3_text"
        if model_type not in HF_FAMILIES:
            raise UnsupportedError(
                f"architecture model_type={model_type!r} is not supported (supported: {', '.join(HF_FAMILIES)})"
            )
        rope = _hf_rope(hf)
        common = dict(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope["theta"],
            rope_scaling_factor=rope["factor"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma3_text")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        act = _hf_activation(hf.get("hidden_act") or hf.get("hidden_activation") or "silu")
        if model_type in ("llama", "qwen2"):
            bias = bool(hf.get("attention_bias", False)) or model_type == "qwen2"
            return cls(**common, norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=bias,
                       attn_out_bias=bool(hf.get("attention_bias", False)),
                       mlp_bias=bool(hf.get("mlp_bias", False)), activation=act)
        if model_type == "phi":
            if hf.get("qk_layernorm"):
                raise UnsupportedError("phi with qk_layernorm=true is not supported")
            head_dim = hf["hidden_size"] // hf["num_attention_heads"]
            return cls(**common, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5), norm_bias=True,
                       parallel_residual=True, qkv_bias=True, attn_out_bias=True, mlp="plain",
                       activation=act, mlp_bias=True, lm_head_bias=True,
                       rotary_dim=int(head_dim * rope["partial_rotary_factor"]))
        # gemma3_text
        if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
            raise UnsupportedError("gemma3 logit soft-capping is not supported")
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedError("gemma3 with bidirectional attention is not supported")
        n_layers = hf["num_hidden_layers"]
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
        ]
        return cls(**common, norm_eps=hf.get("rms_norm_eps", 1e-6), norm_unit_offset=True, sandwich_norm=True,
                   qk_norm=True, query_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5, activation=act,
                   embed_scale=True, sliding_window=hf.get("sliding_window") or 0, layer_types=layer_types,
                   rope_local_theta=rope["local_theta"])

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict that transformers loads as the same model."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_scaling_factor}
        hf: dict[str, Any] = dict(
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            rope_parameters=rope,
        )
        act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[self.activation]
        if self.family in ("llama", "qwen2"):
            hf.update(architectures=["LlamaForCausalLM" if self.family == "llama" else "Qwen2ForCausalLM"],
                      head_dim=self.head_dim, rms_norm_eps=self.norm_eps, hidden_act=act)
            if self.family == "llama":
                hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.family == "phi":
            rope["partial_rotary_factor"] = self.rotary_dim / self.head_dim
            hf.update(architectures=["PhiForCausalLM"], layer_norm_eps=self.norm_eps,
                      hidden_act="gelu_new" if self.activation == "gelu_tanh" else act, qk_layernorm=False)
        else:
            hf.update(architectures=["Gemma3ForCausalLM"], head_dim=self.head_dim, rms_norm_eps=self.norm_eps,
                      hidden_activation=act, query_pre_attn_scalar=self.query_scale ** -2,
                      sliding_window=self.sliding_window or None, layer_types=self.layer_types,
                      rope_parameters={
                          "full_attention": rope,
                          "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta},
                      })
        return hf

    # ----------------------------------------------------------- GGUF metadata
    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> "ModelConfig":
        arch = meta.get("general.architecture")
        family = GGUF_ARCH_TO_FAMILY.get(arch)
        if family is None:
            raise UnsupportedError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCH_TO_FAMILY)})"
            )

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        hidden, n_heads = get("embedding_length"), get("attention.head_count")
        n_layers = get("block_count")
        vocab = tensor_shapes["token_embd.weight"][0]
        head_dim = get("attention.key_length") or hidden // n_heads
        scaling = get("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UnsupportedError(f"GGUF rope scaling type {scaling!r} is not supported")
        common = dict(
            family=family,
            vocab_size=vocab,
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv") or n_heads,
            head_dim=head_dim,
            intermediate_size=get("feed_forward_length"),
            max_position_embeddings=get("context_length", 2048),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling_factor=float(get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            tie_word_embeddings="output.weight" not in tensor_shapes,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
        if family in ("llama", "qwen2"):
            return cls(**common, norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
                       qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
                       attn_out_bias="blk.0.attn_output.bias" in tensor_shapes,
                       mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
                       rotary_dim=get("rope.dimension_count") or 0)
        if family == "phi":
            up = tensor_shapes["blk.0.ffn_up.weight"]
            common["intermediate_size"] = up[0]
            return cls(**common, norm="layernorm", norm_eps=get("attention.layer_norm_epsilon", 1e-5),
                       norm_bias=True, parallel_residual=True, qkv_bias=True, attn_out_bias=True, mlp="plain",
                       activation="gelu_tanh", mlp_bias=True, lm_head_bias="output.bias" in tensor_shapes,
                       rotary_dim=get("rope.dimension_count") or 0)
        # gemma3: every 6th layer is global attention, the rest use a sliding window (llama.cpp swa pattern 6)
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
        return cls(**common, norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6), norm_unit_offset=True,
                   sandwich_norm=True, qk_norm=True, activation="gelu_tanh", embed_scale=True,
                   sliding_window=get("attention.sliding_window", 0), layer_types=layer_types,
                   rope_local_theta=float(get("rope.local.freq_base", 10000.0)))


GGUF_ARCH_TO_FAMILY = {"llama": "llama", "phi2": "phi", "qwen2": "qwen2", "gemma3": "gemma3_text"}


def _hf_activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_fast": "gelu_tanh", "gelu": "gelu"}
    if name not in table:
        raise UnsupportedError(f"activation {name!r} is not supported")
    return table[name]


def _hf_rope(hf: dict[str, Any]) -> dict[str, float]:
    """RoPE settings from either the transformers-5 ``rope_parameters`` or the older flat keys."""
    params = hf.get("rope_parameters") or {}
    full = params.get("full_attention", params) if isinstance(params, dict) else {}
    local = params.get("sliding_attention", {}) if isinstance(params, dict) else {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = full.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise UnsupportedError(f"RoPE type {rope_type!r} is not supported (default and linear are)")
    theta = full.get("rope_theta") or hf.get("rope_theta") or 10000.0
    return {
        "theta": float(theta),
        "factor": float(full.get("factor") or scaling.get("factor") or 1.0) if rope_type == "linear" else 1.0,
        "local_theta": float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0),
        "partial_rotary_factor": float(full.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0),
    }


# Published dimensions. Each preset mirrors the config.json named in its comment.
PRESETS: dict[str, dict[str, Any]] = {
    # huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json
    "tinyllama-1.1b": dict(family="llama", vocab_size=32000, hidden_size=2048, n_layers=22, n_heads=32,
                           n_kv_heads=4, intermediate_size=5632, max_position_embeddings=2048, norm_eps=1e-5,
                           rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # huggingface.co/ahxt/LiteLlama-460M-1T/blob/main/config.json
    "litellama-460m": dict(family="llama", vocab_size=50304, hidden_size=1024, n_layers=24, n_heads=16,
                           n_kv_heads=2, intermediate_size=4096, max_position_embeddings=1024, norm_eps=1e-6,
                           rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0),
    # phi-1 paper section 2.3 (same architecture as phi-1.5, rotary dim 32)
    "phi-1": dict(family="phi", vocab_size=51200, hidden_size=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                  intermediate_size=8192, max_position_embeddings=2048, norm="layernorm", norm_eps=1e-5,
                  norm_bias=True, parallel_residual=True, qkv_bias=True, attn_out_bias=True, mlp="plain",
                  activation="gelu_tanh", mlp_bias=True, lm_head_bias=True, rotary_dim=32,
                  tie_word_embeddings=False),
    # huggingface.co/microsoft/phi-1_5/blob/main/config.json
    "phi-1.5": dict(family="phi", vocab_size=51200, hidden_size=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                    intermediate_size=8192, max_position_embeddings=2048, norm="layernorm", norm_eps=1e-5,
                    norm_bias=True, parallel_residual=True, qkv_bias=True, attn_out_bias=True, mlp="plain",
                    activation="gelu_tanh", mlp_bias=True, lm_head_bias=True, rotary_dim=32,
                    tie_word_embeddings=False),
    # huggingface.co/microsoft/phi-2/blob/main/config.json
    "phi-2": dict(family="phi", vocab_size=51200, hidden_size=2560, n_layers=32, n_heads=32, n_kv_heads=32,
                  intermediate_size=10240, max_position_embeddings=2048, norm="layernorm", norm_eps=1e-5,
                  norm_bias=True, parallel_residual=True, qkv_bias=True, attn_out_bias=True, mlp="plain",
                  activation="gelu_tanh", mlp_bias=True, lm_head_bias=True, rotary_dim=32,
                  tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256),
    # huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         intermediate_size=1536, max_position_embeddings=8192, norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json
    "smollm2-360m": dict(family="llama", vocab_size=49152, hidden_size=960, n_layers=32, n_heads=15, n_kv_heads=5,
                         intermediate_size=2560, max_position_embeddings=8192, norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json
    "smollm2-1.7b": dict(family="llama", vocab_size=49152, hidden_size=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                         intermediate_size=8192, max_position_embeddings=8192, norm_eps=1e-5, rope_theta=130000.0,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # huggingface.co/google/gemma-3-270m/blob/main/config.json
    "gemma3-270m": dict(family="gemma3_text", vocab_size=262144, hidden_size=640, n_layers=18, n_heads=4,
                        n_kv_heads=1, head_dim=256, intermediate_size=2048, max_position_embeddings=32768,
                        norm_eps=1e-6, norm_unit_offset=True, sandwich_norm=True, qk_norm=True,
                        query_scale=256 ** -0.5, rope_theta=1_000_000.0, rope_local_theta=10000.0,
                        sliding_window=512, layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention"
                                                         for i in range(18)],
                        activation="gelu_tanh", embed_scale=True, tie_word_embeddings=True,
                        bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         intermediate_size=4864, max_position_embeddings=32768, norm_eps=1e-6, qkv_bias=True,
                         rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=151643,
                         eos_token_id=151643),
}
