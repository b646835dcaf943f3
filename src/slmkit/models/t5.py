"""T5 / Flan-T5 encoder–decoder, numerically matching transformers' ``t5`` (5.24), with HF key mapping.

Architecture::

    shared embedding (no sqrt(d) scaling) feeds both stacks
    encoder block:  x += SelfAttn(norm x)                  bidirectional
                    x += FFN(norm x)
    decoder block:  x += SelfAttn(norm x)                  causal, K/V cached while generating
                    x += CrossAttn(norm x, encoder_out)    K/V computed once from the encoder output
                    x += FFN(norm x)
    each stack ends with a norm; logits = head(decoder_out)

* attention: q/k/v/o without biases and **without** the 1/sqrt(d_kv) scaling. A relative-position bias
  (log-spaced buckets, 32 up to distance 128) is looked up in a table held by layer 0 of each stack and
  added to the scores of every layer; encoder buckets are bidirectional, decoder buckets causal.
* norm: RMS without mean subtraction or bias, eps 1e-6, statistics in fp32, cast to the weight dtype.
* FFN: ``wo(relu(wi x))`` (v1.0) or ``wo(gelu_new(wi_0 x) * wi_1 x)`` (v1.1 / Flan, "gated-gelu").
  In fp16 ``wo`` stays fp32 (as transformers keeps it), so the residual stream runs in fp32.
* head: v1.0 ties it to the embedding and multiplies the decoder output by d_model**-0.5 first;
  v1.1 / Flan have their own ``lm_head`` and no scaling. As in transformers 5.24, tying follows the file
  (a distinct ``lm_head.weight`` is used untied) and scaling follows the config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError, SlmError, UnsupportedError
from .build import check_weights

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, used only by the non-gated "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_ARCHITECTURES = {"T5ForConditionalGeneration", "T5WithLMHeadModel", "T5Model"}


def parse_feed_forward_proj(proj: str) -> tuple[bool, str]:
    """``"relu"`` -> (False, "relu"); ``"gated-gelu"`` -> (True, "gelu_new"), as transformers reads it."""
    parts = proj.split("-") if isinstance(proj, str) else []
    gated = len(parts) == 2 and parts[0] == "gated"
    act = parts[-1] if parts else None
    if proj == "gated-gelu":
        act = "gelu_new"  # transformers' backwards-compatibility rule: gated-gelu is the tanh GELU
    if not parts or len(parts) > 2 or (len(parts) == 2 and not gated) or act not in _ACTIVATIONS:
        raise UnsupportedError(f"T5 feed_forward_proj {proj!r} is not supported (choose from relu, gelu, silu, "
                               f"gated-gelu, gated-gelu_new, gated-relu, gated-silu)")
    return gated, act


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True  # lm_head is the shared embedding
    scale_decoder_outputs: bool | None = None  # None: same as tie_word_embeddings
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    dropout_rate: float = 0.0

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SlmError(f"T5 config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.relative_attention_num_buckets, int) or self.relative_attention_num_buckets < 4:
            raise SlmError(f"T5 config: relative_attention_num_buckets must be an integer >= 4, "
                           f"got {self.relative_attention_num_buckets!r}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise SlmError(f"T5 config: relative_attention_max_distance {self.relative_attention_max_distance} "
                           f"must exceed half the bucket count (the causal exact-distance range)")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise SlmError(f"T5 config: dropout_rate must be in [0, 1), got {self.dropout_rate}")
        parse_feed_forward_proj(self.feed_forward_proj)

    @property
    def gated(self) -> bool:
        return parse_feed_forward_proj(self.feed_forward_proj)[0]

    @property
    def activation(self) -> str:
        return parse_feed_forward_proj(self.feed_forward_proj)[1]

    @property
    def eos_ids(self) -> set[int]:
        eos = self.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()

    def num_parameters(self) -> int:
        d, inner, ff = self.d_model, self.num_heads * self.d_kv, self.d_ff
        attn = 4 * d * inner
        ffn = (3 if self.gated else 2) * d * ff
        rel = self.relative_attention_num_buckets * self.num_heads
        enc = self.num_layers * (attn + ffn + 2 * d) + rel + d
        dec = self.num_decoder_layers * (2 * attn + ffn + 3 * d) + rel + d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + enc + dec + head

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        """Read a Hugging Face ``config.json`` dict of ``model_type`` t5 (absent fields take HF's defaults)."""
        if d.get("model_type") != "t5":
            raise UnsupportedError(f"model_type {d.get('model_type')!r} is not T5 (only model_type 't5' is "
                                   f"supported by the encoder-decoder loader)")
        if d.get("is_encoder_decoder") is False or d.get("is_decoder") is True:
            raise UnsupportedError("this T5 config is not an encoder-decoder (is_encoder_decoder false or "
                                   "is_decoder true); only T5ForConditionalGeneration checkpoints are supported")
        archs = [a for a in d.get("architectures") or [] if a not in _ARCHITECTURES]
        if archs:
            raise UnsupportedError(f"T5 architecture {', '.join(archs)} is not supported "
                                   f"(supported: {', '.join(sorted(_ARCHITECTURES))})")
        tie = d.get("tie_word_embeddings", True) is not False
        fields = {f.name for f in dataclasses.fields(cls)} - {"tie_word_embeddings", "scale_decoder_outputs"}
        kwargs = {k: d[k] for k in fields if d.get(k) is not None}
        kwargs.setdefault("decoder_start_token_id", kwargs.get("pad_token_id", 0))  # T5 starts from pad
        scale = d.get("scale_decoder_outputs")
        return cls(**kwargs, tie_word_embeddings=tie, scale_decoder_outputs=tie if scale is None else bool(scale))

    def to_hf(self) -> dict:
        """A ``config.json`` dict transformers 4.x and 5.x both read back to the same model."""
        out = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True}
        out.update(dataclasses.asdict(self))
        out["dense_act_fn"], out["is_gated_act"] = self.activation, self.gated
        return out


# ---------------------------------------------------------------------------------------------- layers
class T5Norm(nn.Module):
    """``w * x / rms(x)``: no mean subtraction, no bias; fp32 statistics, cast to the weight dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class T5FFN(nn.Module):
    """``down(act(up x))`` or, gated, ``down(act(gate x) * up x)`` (HF wi / wi_0, wi_1, wo)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.gated else None
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = _ACTIVATIONS[cfg.activation]
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.drop(h).to(self.down.weight.dtype))  # down may be kept in fp32


class T5Attention(nn.Module):
    """Multi-head attention with an additive bias and no score scaling."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.heads, self.d_kv, self.dropout = cfg.num_heads, cfg.d_kv, cfg.dropout_rate
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def split(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return lin(x).view(b, t, self.heads, self.d_kv).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k, x), self.split(self.v, x)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q = self.split(self.q, x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.d_kv))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard against fp16 overflow: clamp to the largest finite value (less 1000 after an inf)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm, self.attn = T5Norm(cfg.d_model, cfg.layer_norm_epsilon), T5Attention(cfg)
        self.ffn_norm, self.ffn = T5Norm(cfg.d_model, cfg.layer_norm_epsilon), T5FFN(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = _clamp_fp16(x + self.drop(self.attn.attend(h, *self.attn.kv(h), bias)))
        return _clamp_fp16(x + self.drop(self.ffn(self.ffn_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm, self.attn = T5Norm(cfg.d_model, cfg.layer_norm_epsilon), T5Attention(cfg)
        self.cross_norm, self.cross = T5Norm(cfg.d_model, cfg.layer_norm_epsilon), T5Attention(cfg)
        self.ffn_norm, self.ffn = T5Norm(cfg.d_model, cfg.layer_norm_epsilon), T5FFN(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, self_bias, cross_kv, cross_bias, cache: "T5Cache | None", index: int, start: int):
        h = self.attn_norm(x)
        k, v = self.attn.kv(h)
        if cache is not None:
            k, v = cache.write(index, k, v, start)
        x = _clamp_fp16(x + self.drop(self.attn.attend(h, k, v, self_bias)))
        x = _clamp_fp16(x + self.drop(self.cross.attend(self.cross_norm(x), *cross_kv, cross_bias)))
        return _clamp_fp16(x + self.drop(self.ffn(self.ffn_norm(x))))


# ----------------------------------------------------------------------------- relative position bias
def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of ``key_pos - query_pos``: exact below half the (per-direction) buckets, log-spaced above,
    everything beyond ``max_distance`` in the last bucket. Causal buckets treat future keys as distance 0."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.clamp(min=1).float() / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5Cache:
    """Decoder state while generating: per layer, self-attention K/V for the tokens so far (grown by doubling
    when a write passes the end) and cross-attention K/V computed once from the encoder output."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.length = 0  # tokens written so far

    def write(self, index: int, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        if index == len(self.keys):  # first write to this layer: allocate
            shape = (k.shape[0], k.shape[1], max(self.capacity, end), k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        if end > self.keys[index].shape[2]:
            grow = max(end, 2 * self.keys[index].shape[2]) - self.keys[index].shape[2]
            pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], grow, t.shape[3])], dim=2)  # noqa: E731
            self.keys[index], self.values[index] = pad(self.keys[index]), pad(self.values[index])
        self.keys[index][:, :, start:end] = k
        self.values[index][:, :, start:end] = v
        if index == 0:
            self.length = end
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]


# ------------------------------------------------------------------------------------------ the model
class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict({
            "rel_bias": nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads),
            "layers": nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers)),
            "norm": T5Norm(cfg.d_model, cfg.layer_norm_epsilon)})
        self.decoder = nn.ModuleDict({
            "rel_bias": nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads),
            "layers": nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)),
            "norm": T5Norm(cfg.d_model, cfg.layer_norm_epsilon)})
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout_rate)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def _rel_bias(self, stack: nn.ModuleDict, q_len: int, k_len: int, start: int, bidirectional: bool):
        dev = self.device
        rel = torch.arange(k_len, device=dev)[None, :] - (torch.arange(q_len, device=dev)[:, None] + start)
        buckets = relative_position_bucket(rel, bidirectional, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return stack["rel_bias"](buckets).permute(2, 0, 1)[None]  # [1, heads, q, k]

    def _padding_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, S] keep-mask (1 real, 0 pad) -> additive [B, 1, 1, S]."""
        if mask is None:
            return None
        return ((1.0 - mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B, S, d_model] (rows of ``attention_mask`` are 1 for tokens, 0 for padding)."""
        x = self.drop(self.embed(input_ids))
        s = input_ids.shape[1]
        bias = self._rel_bias(self.encoder, s, s, 0, bidirectional=True)
        pad = self._padding_bias(attention_mask, bias.dtype)
        if pad is not None:
            bias = bias + pad
        for layer in self.encoder["layers"]:
            x = layer(x, bias)
        return self.drop(self.encoder["norm"](x))

    def new_cache(self, capacity: int = 0) -> T5Cache:
        return T5Cache(capacity)

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross.kv(encoder_out) for layer in self.decoder["layers"]]

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               encoder_mask: torch.Tensor | None = None, cache: T5Cache | None = None, start: int = 0,
               last_only: bool = False) -> torch.Tensor:
        """Logits for ``decoder_input_ids`` at decoder positions ``start``... With a cache, their self-attention
        K/V are written at those positions and attention covers everything before; without one, ``start`` must
        be 0. The cross-attention K/V are computed on the first call and kept in the cache."""
        if cache is None and start != 0:
            raise SlmError("T5.decode: start > 0 needs the cache that holds the earlier positions")
        t = decoder_input_ids.shape[1]
        x = self.drop(self.embed(decoder_input_ids))
        bias = self._rel_bias(self.decoder, t, start + t, start, bidirectional=False)
        if t > 1:
            q_pos = torch.arange(start, start + t, device=self.device)[:, None]
            future = torch.arange(start + t, device=self.device)[None, :] > q_pos
            bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)
        if cache is not None and cache.cross is not None:
            cross = cache.cross
        else:
            cross = self.cross_kv(encoder_out)
            if cache is not None:
                cache.cross = cross
        cross_bias = self._padding_bias(encoder_mask, bias.dtype)
        if cross_bias is None:
            cross_bias = bias.new_zeros(1, 1, 1, cross[0][0].shape[2])
        for i, layer in enumerate(self.decoder["layers"]):
            x = layer(x, bias, cross[i], cross_bias, cache, i, start)
        x = self.drop(self.decoder["norm"](x))
        return self.head(x[:, -1:] if last_only else x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg.scale_decoder_outputs:
            h = h * self.cfg.d_model ** -0.5
        return F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, vocab]; ``labels`` alone gives ``decoder_input_ids = shift_right(labels)``."""
        if decoder_input_ids is None:
            if labels is None:
                raise SlmError("T5 forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor):
        """Mean cross-entropy over label positions that are not -100 (transformers' seq2seq loss)."""
        logits = self(input_ids, attention_mask, labels=labels)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``labels``: decoder_start_token_id, then labels[:-1], with -100 -> pad."""
        shifted = labels.new_zeros(labels.shape)
        shifted[..., 1:] = labels[..., :-1]
        shifted[..., 0] = self.cfg.decoder_start_token_id
        return shifted.masked_fill(shifted == -100, self.cfg.pad_token_id)


# ------------------------------------------------------------------------------------ HF key mapping
_SUBLAYERS = {"encoder": ("attn", "ffn"), "decoder": ("attn", "cross", "ffn")}
_INNER = {"SelfAttention": "attn", "EncDecAttention": "cross", "DenseReluDense": "ffn"}
_FFN = {"wi": "up", "wi_0": "gate", "wi_1": "up", "wo": "down"}
_BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(?:layer_norm|(\w+)\.(\w+))\.weight")
# present in some checkpoints, never used by transformers either
_IGNORED = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


def hf_to_t5_key(name: str) -> str | None:
    """``encoder.block.3.layer.1.DenseReluDense.wi_0.weight`` -> ``encoder.layers.3.ffn.gate.weight``;
    None for a name that is not part of a T5 checkpoint."""
    simple = {"shared.weight": "embed.weight", "lm_head.weight": "lm_head.weight",
              "encoder.final_layer_norm.weight": "encoder.norm.weight",
              "decoder.final_layer_norm.weight": "decoder.norm.weight",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder.rel_bias.weight",
              "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder.rel_bias.weight"}
    if name in simple:
        return simple[name]
    m = _BLOCK.fullmatch(name)
    if m is None:
        return None
    stack, block, sub, inner, leaf = m.groups()
    roles = _SUBLAYERS[stack]
    if int(sub) >= len(roles):
        return None
    role = roles[int(sub)]
    prefix = f"{stack}.layers.{block}"
    if inner is None:
        return f"{prefix}.{role}_norm.weight"
    if _INNER.get(inner) != role:
        return None
    if role == "ffn":
        return f"{prefix}.ffn.{_FFN[leaf]}.weight" if leaf in _FFN else None
    return f"{prefix}.{role}.{leaf}.weight" if leaf in ("q", "k", "v", "o") else None


def t5_to_hf_key(name: str, cfg: T5Config) -> str:
    """The inverse of :func:`hf_to_t5_key` (``ffn.up`` is ``wi_1`` when the FFN is gated, else ``wi``)."""
    simple = {"embed.weight": "shared.weight", "lm_head.weight": "lm_head.weight",
              "encoder.norm.weight": "encoder.final_layer_norm.weight",
              "decoder.norm.weight": "decoder.final_layer_norm.weight",
              "encoder.rel_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "decoder.rel_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    if name in simple:
        return simple[name]
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(\w+?)(_norm)?\.(?:(\w+)\.)?weight", name)
    if m is None:
        raise KeyError(f"not a T5 parameter name: {name}")
    stack, block, role, is_norm, leaf = m.groups()
    sub = _SUBLAYERS[stack].index(role)
    prefix = f"{stack}.block.{block}.layer.{sub}"
    if is_norm:
        return f"{prefix}.layer_norm.weight"
    inner = {v: k for k, v in _INNER.items()}[role]
    if role == "ffn":
        leaf = {"gate": "wi_0", "up": "wi_1" if cfg.gated else "wi", "down": "wo"}[leaf]
    return f"{prefix}.{inner}.{leaf}.weight"


def t5_state_from_hf(hf_state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an HF T5 state dict to slmkit's names; aliases of the shared embedding are dropped."""
    state, unknown = {}, []
    for name, tensor in hf_state.items():
        if name in _IGNORED:
            continue
        key = hf_to_t5_key(name)
        if key is None:
            unknown.append(name)
        else:
            state[key] = tensor
    if "embed.weight" not in state:  # some exports store only the per-stack alias
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in hf_state:
                state["embed.weight"] = hf_state[alias]
                break
    if unknown:
        raise ModelFileError(f"{source}: not a T5 checkpoint: unexpected {len(unknown)} tensor(s), "
                             f"e.g. {', '.join(sorted(unknown)[:3])}")
    return state


def t5_state_to_hf(state: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """slmkit names -> HF names, contiguous CPU tensors ready for safetensors (no lm_head when tied)."""
    return {t5_to_hf_key(k, cfg): v.detach().contiguous().cpu() for k, v in state.items()
            if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def load_t5_state(model: T5, hf_state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  source: str = "checkpoint") -> T5:
    """Put an HF-named state dict into ``model`` (which may live on the meta device); names and shapes
    must match exactly, else ModelFileError naming the HF tensors at fault."""
    state = t5_state_from_hf(hf_state, source)
    cfg = model.cfg
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    check_weights(model.state_dict(), state, source, "the T5 config", name_of=lambda k: t5_to_hf_key(k, cfg))
    keep_fp32 = dtype == torch.float16  # transformers keeps the FFN output projection (wo) in fp32 for fp16
    model.load_state_dict({k: v.to(torch.float32 if keep_fp32 and k.endswith("ffn.down.weight") else dtype)
                           for k, v in state.items()}, assign=True)
    return model.eval()


def build_t5(hf_config: dict, hf_state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
             source: str = "checkpoint") -> T5:
    """A T5 from an HF config dict and HF-named weights. Tying follows the file, as in transformers 5.24:
    a ``lm_head.weight`` that differs from ``shared.weight`` is used untied, otherwise the head is tied."""
    cfg = T5Config.from_hf(hf_config)
    head, shared = hf_state.get("lm_head.weight"), hf_state.get("shared.weight")
    tied = head is None or (shared is not None and head.shape == shared.shape and torch.equal(head, shared))
    cfg = dataclasses.replace(cfg, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = T5(cfg)
    return load_t5_state(model, hf_state, dtype, source)
