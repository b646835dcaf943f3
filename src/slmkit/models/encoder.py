"""Bidirectional Transformer encoders: BERT and RoBERTa, read from and written to HF checkpoints.

One Post-LN architecture (``x = LN(x + attn(x))``; ``x = LN(x + mlp(x))``) with biases everywhere;
the two families differ only by flags in :class:`EncoderConfig`:

* ``position_style="absolute"`` (BERT): position ids ``0..T-1``.
* ``position_style="roberta"``: ``pos = cumsum(ids != pad) * (ids != pad) + pad``, so real tokens
  start at ``pad + 1`` and pads sit at ``pad`` (fairseq's ``make_positions``).
* the MLM head's activation: BERT uses ``hidden_act``, RoBERTa's ``lm_head`` always exact GELU.

Heads: :class:`MaskedLMHead` (decoder tied to the word embeddings unless the config unties it),
:class:`ClassificationHead` (``out(tanh(dense(h[:, 0])))``: for BERT ``dense`` is the pooler, for
RoBERTa it is ``classifier.dense``) and :func:`mean_pool`. :class:`EncoderModel` bundles them.

slmkit's parameter names (``encoder.layers.N.attn.q``, ``mlm_head.dense``...) are mapped to and from
HF's (``bert.encoder.layer.N.attention.self.query``, ``cls.predictions.transform.dense``...) by
:func:`hf_to_encoder_key` / :func:`encoder_state_for_hf`; :func:`load_encoder_state` checks a
checkpoint tensor by tensor and names what is missing or unexpected.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ContextLengthError, ModelFileError, UnsupportedError
from .build import check_weights

FAMILIES = ("bert", "roberta")
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
# HF architectures -> the heads their checkpoints carry
_HEADS_BY_ARCH = {"Model": (), "ForMaskedLM": ("mlm",), "ForPreTraining": ("mlm",),
                  "ForSequenceClassification": ("classifier",)}
_ARCH_PREFIX = {"bert": "Bert", "roberta": "Roberta"}


# ------------------------------------------------------------------------------------------------ config
@dataclass
class EncoderConfig:
    family: str = "bert"  # checkpoint key layout and HF model_type: bert | roberta
    vocab_size: int = 30522
    hidden_size: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # gelu (exact erf) | gelu_new / gelu_pytorch_tanh / gelu_fast (tanh) | relu | silu
    pad_token_id: int = 0
    position_style: str = "absolute"  # absolute (BERT) | roberta (positions count from pad + 1)
    tie_word_embeddings: bool = True  # MLM decoder weight = word embeddings
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None -> hidden_dropout_prob
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None  # regression | single_label_classification | multi_label_classification
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedError(f"encoder family {self.family!r} is not supported "
                                   f"(supported: {', '.join(FAMILIES)})")
        if self.position_style not in ("absolute", "roberta"):
            raise UnsupportedError(f"position_style {self.position_style!r} is not supported (absolute, roberta)")
        if self.hidden_act not in _ACTIVATIONS:
            raise UnsupportedError(f"hidden_act {self.hidden_act!r} is not supported "
                                   f"(supported: {', '.join(_ACTIVATIONS)})")
        if self.hidden_size % self.n_heads:
            raise UnsupportedError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (RoBERTa loses pad + 1 rows to its offset)."""
        if self.position_style == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "EncoderConfig":
        """From a BERT / RoBERTa ``config.json`` dict; anything this encoder cannot run is named."""
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise UnsupportedError(f"model_type={family!r} is not an encoder slmkit runs "
                                   f"(supported: {', '.join(FAMILIES)})")
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise UnsupportedError(f"position_embedding_type={pos_type!r} is not supported (only 'absolute')")
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag):
                raise UnsupportedError(f"{flag}=true is not supported: slmkit runs BERT/RoBERTa as encoders only")
        try:
            id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
            num_labels = int(hf.get("num_labels") or len(id2label) or 2)
            return cls(
                family=family,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                hidden_act=str(hf.get("hidden_act", "gelu")),
                pad_token_id=int(hf["pad_token_id"] if hf.get("pad_token_id") is not None
                                 else (1 if family == "roberta" else 0)),
                position_style="roberta" if family == "roberta" else "absolute",
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                hidden_dropout_prob=float(hf.get("hidden_dropout_prob", 0.1)),
                attention_probs_dropout_prob=float(hf.get("attention_probs_dropout_prob", 0.1)),
                classifier_dropout=hf.get("classifier_dropout"),
                num_labels=num_labels,
                id2label=id2label,
                problem_type=hf.get("problem_type"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        except KeyError as e:
            raise ModelFileError(f"config.json: missing required field {e}") from None
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"config.json: bad value ({e})") from None

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads back as the same model (architectures not set)."""
        labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        return dict(
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            position_embedding_type="absolute",
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            classifier_dropout=self.classifier_dropout,
            id2label={str(i): name for i, name in labels.items()},
            label2id={name: i for i, name in labels.items()},
            problem_type=self.problem_type,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ blocks
class Embeddings(nn.Module):
    """word + position + token type, then LayerNorm (and dropout while training)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n = input_ids.shape[1]
        if n > cfg.max_tokens:
            raise ContextLengthError(f"input has {n} tokens; this encoder takes at most {cfg.max_tokens}")
        if cfg.position_style == "roberta":
            real = input_ids.ne(cfg.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + cfg.pad_token_id
        return torch.arange(n, device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(self.position_ids(input_ids))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biases; scale 1/sqrt(head_dim)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim, self.p_drop = cfg.n_heads, cfg.head_dim, cfg.attention_probs_dropout_prob
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.p_drop if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class EncoderLayer(nn.Module):
    """Post-LN: ``x = LN(x + drop(attn x))``; ``x = LN(x + drop(mlp x))``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = FeedForward(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Encoder(nn.Module):
    """Embeddings and the layer stack: token ids -> hidden states ``[B, T, D]``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        # [B, 1, 1, T] boolean: every query may attend to the real (mask == 1) keys only
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ------------------------------------------------------------------------------------------------- heads
class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder + bias; the decoder weight is the word embeddings
    (passed in by :class:`EncoderModel`) unless the config unties it."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # RoBERTa's lm_head hard-codes exact GELU; BERT's transform uses hidden_act
        self.act = _ACTIVATIONS["gelu" if cfg.family == "roberta" else cfg.hidden_act]
        self.decoder = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.act(self.dense(hidden)))
        return F.linear(x, word_embeddings if self.decoder is None else self.decoder.weight, self.bias)


class ClassificationHead(nn.Module):
    """``out(drop(tanh(dense(drop(h[:, 0])))))``: BERT's pooler + classifier, RoBERTa's classification head."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.roberta = cfg.family == "roberta"  # RoBERTa also drops out the <s> state before dense

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        first = hidden[:, 0]
        return torch.tanh(self.dense(self.dropout(first) if self.roberta else first))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.pooled(hidden)))


class Pooler(nn.Module):
    """BERT's pooler on its own (``BertModel``): ``tanh(dense(h[:, 0]))``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the real tokens' hidden states (the sentence-transformers recipe): ``[B, T, D] -> [B, D]``."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class EncoderModel(nn.Module):
    """An :class:`Encoder` plus the heads its checkpoint carries (``mlm``, ``classifier``, ``pooler``)."""

    def __init__(self, cfg: EncoderConfig, heads: tuple[str, ...] = ()):
        super().__init__()
        unknown = set(heads) - {"mlm", "classifier", "pooler"}
        if unknown:
            raise UnsupportedError(f"unknown encoder head(s): {', '.join(sorted(unknown))}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.mlm_head = MaskedLMHead(cfg) if "mlm" in heads else None
        self.classifier = ClassificationHead(cfg) if "classifier" in heads else None
        self.pooler = Pooler(cfg) if "pooler" in heads else None

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(h for h, m in (("mlm", self.mlm_head), ("classifier", self.classifier), ("pooler", self.pooler))
                     if m is not None)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.embeddings.word.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states ``[B, T, D]``."""
        return self.encoder(input_ids, attention_mask, token_type_ids)

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits ``[B, T, V]``."""
        if self.mlm_head is None:
            raise UnsupportedError("this checkpoint has no masked-LM head (load a *ForMaskedLM model)")
        return self.mlm_head(self(input_ids, attention_mask, token_type_ids), self.encoder.embeddings.word.weight)

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-classification logits ``[B, num_labels]``."""
        if self.classifier is None:
            raise UnsupportedError("this checkpoint has no classification head "
                                   "(load a *ForSequenceClassification model)")
        return self.classifier(self(input_ids, attention_mask, token_type_ids))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """BERT's ``pooler_output`` ``[B, D]`` (the pooler, or the classifier's dense layer, on [CLS])."""
        hidden = self(input_ids, attention_mask, token_type_ids)
        if self.pooler is not None:
            return self.pooler(hidden)
        if self.classifier is not None and self.cfg.family == "bert":
            return self.classifier.pooled(hidden)
        raise UnsupportedError("this checkpoint has no pooler")


# ------------------------------------------------------------------------------------------ key mapping
_BODY = [  # (HF fragment after the family prefix, slmkit fragment)
    ("embeddings.word_embeddings.", "encoder.embeddings.word."),
    ("embeddings.position_embeddings.", "encoder.embeddings.position."),
    ("embeddings.token_type_embeddings.", "encoder.embeddings.token_type."),
    ("embeddings.LayerNorm.", "encoder.embeddings.norm."),
]
_LAYER = [
    ("attention.self.query.", "attn.q."),
    ("attention.self.key.", "attn.k."),
    ("attention.self.value.", "attn.v."),
    ("attention.output.dense.", "attn.o."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "mlp.up."),
    ("output.dense.", "mlp.down."),
    ("output.LayerNorm.", "mlp_norm."),
]
_HEAD_KEYS = {
    "bert": [
        ("cls.predictions.transform.dense.", "mlm_head.dense."),
        ("cls.predictions.transform.LayerNorm.", "mlm_head.norm."),
        ("cls.predictions.decoder.weight", "mlm_head.decoder.weight"),
        ("cls.predictions.bias", "mlm_head.bias"),
        ("classifier.", "classifier.out."),
    ],
    "roberta": [
        ("lm_head.dense.", "mlm_head.dense."),
        ("lm_head.layer_norm.", "mlm_head.norm."),
        ("lm_head.decoder.weight", "mlm_head.decoder.weight"),
        ("lm_head.bias", "mlm_head.bias"),
        ("classifier.dense.", "classifier.dense."),
        ("classifier.out_proj.", "classifier.out."),
    ],
}
# buffers and heads HF checkpoints may carry that no slmkit module uses
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^cls\.seq_relationship\.|^cls\.predictions\.decoder\.bias$"
                      r"|^lm_head\.decoder\.bias$")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def _strip_prefix(key: str, family: str) -> str:
    return key[len(family) + 1:] if key.startswith(family + ".") else key


def hf_to_encoder_key(key: str, family: str, bert_classifier: bool = False) -> str | None:
    """One HF tensor name -> slmkit's name; ``None`` for tensors slmkit does not use, the name unchanged
    (so it is reported as unexpected) when nothing maps it. ``bert_classifier``: the BERT pooler is the
    classification head's dense layer."""
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
    if _IGNORED.search(key):
        return None
    key = _strip_prefix(key, family)
    if key.startswith("pooler.dense."):
        return ("classifier.dense." if bert_classifier else "pooler.dense.") + key[len("pooler.dense."):]
    m = _LAYER_KEY.match(key)
    if m:
        for hf, slm in _LAYER:
            if m.group(2).startswith(hf):
                return f"encoder.layers.{m.group(1)}.{slm}{m.group(2)[len(hf):]}"
        return key
    for hf, slm in _BODY + _HEAD_KEYS[family]:
        if key.startswith(hf):
            return slm + key[len(hf):]
    return key


def hf_architecture(model: EncoderModel) -> str:
    """The HF class that holds exactly this model's heads (BertForMaskedLM, RobertaModel...)."""
    heads = set(model.heads) - {"pooler"}
    if heads == {"mlm", "classifier"}:
        raise UnsupportedError("no HF architecture holds both a masked-LM and a classification head; "
                               "drop one head before saving")
    kind = "ForMaskedLM" if "mlm" in heads else "ForSequenceClassification" if "classifier" in heads else "Model"
    return _ARCH_PREFIX[model.cfg.family] + kind


def encoder_key_to_hf(key: str, family: str, prefixed: bool = True) -> str:
    """slmkit's name -> the HF name (``prefixed``: under ``bert.`` / ``roberta.``, as in *For* heads models)."""
    prefix = family + "." if prefixed else ""
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", key)
    if m:
        rest = m.group(2)
        return prefix + next(f"encoder.layer.{m.group(1)}.{hf}{rest[len(slm):]}" for hf, slm in _LAYER
                             if rest.startswith(slm))
    if key.startswith("pooler.dense."):
        return prefix + key
    if key.startswith("classifier.dense.") and family == "bert":
        return prefix + "pooler.dense." + key[len("classifier.dense."):]
    for hf, slm in _BODY:
        if key.startswith(slm):
            return prefix + hf + key[len(slm):]
    return next(hf + key[len(slm):] for hf, slm in _HEAD_KEYS[family] if key.startswith(slm))


def encoder_state_for_hf(model: EncoderModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names ``hf_architecture(model)`` expects (a tied decoder left out; an
    untied one gets its bias twice, as transformers stores it)."""
    prefixed = not hf_architecture(model).endswith("Model")
    out = {encoder_key_to_hf(k, model.cfg.family, prefixed): v.detach() for k, v in model.state_dict().items()}
    if model.mlm_head is not None and model.mlm_head.decoder is not None:  # untied: HF reads the decoder's bias
        bias = "cls.predictions" if model.cfg.family == "bert" else "lm_head"
        out[f"{bias}.decoder.bias"] = out[f"{bias}.bias"].clone()
    return out


# ---------------------------------------------------------------------------------------------- loading
def heads_for(cfg: EncoderConfig, hf_keys: list[str], architectures: list[str] | None = None) -> tuple[str, ...]:
    """The heads to build: those the HF architecture promises plus those whose tensors are present."""
    prefix = _ARCH_PREFIX[cfg.family]
    heads: set[str] = set()
    for arch in architectures or []:
        kind = arch[len(prefix):] if arch.startswith(prefix) else None
        if kind not in _HEADS_BY_ARCH:
            supported = ", ".join(prefix + k for k in _HEADS_BY_ARCH)
            raise UnsupportedError(f"architecture {arch} is not supported (supported: {supported})")
        heads.update(_HEADS_BY_ARCH[kind])
    keys = [_strip_prefix(k, cfg.family) for k in hf_keys if not _IGNORED.search(k)]
    mlm_prefix = "cls.predictions." if cfg.family == "bert" else "lm_head."
    if any(k.startswith(mlm_prefix) for k in keys):
        heads.add("mlm")
    if any(k.startswith("classifier.") for k in keys):
        heads.add("classifier")
    if any(k.startswith("pooler.") for k in keys) and not (cfg.family == "bert" and "classifier" in heads):
        heads.add("pooler")
    return tuple(sorted(heads))


def load_encoder_state(cfg: EncoderConfig, hf_state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                       architectures: list[str] | None = None, source: str = "checkpoint") -> EncoderModel:
    """Build an :class:`EncoderModel` from HF-named tensors; a missing, unexpected or misshapen tensor
    is a :class:`ModelFileError` naming it."""
    heads = heads_for(cfg, list(hf_state), architectures)
    bert_classifier = cfg.family == "bert" and "classifier" in heads
    state: dict[str, torch.Tensor] = {}
    stored_as: dict[str, str] = {}  # slmkit name -> the checkpoint's name, for error messages
    for key, value in hf_state.items():
        name = hf_to_encoder_key(key, cfg.family, bert_classifier)
        if name is not None:
            state[name], stored_as[name] = value, key
    decoder_bias = next((k for k in ("cls.predictions.decoder.bias", "lm_head.decoder.bias") if k in hf_state), None)
    if "mlm" in heads and decoder_bias and (not cfg.tie_word_embeddings or "mlm_head.bias" not in state):
        # HF's forward adds the decoder's own bias; only tied models tie it to cls.predictions.bias / lm_head.bias
        state["mlm_head.bias"], stored_as["mlm_head.bias"] = hf_state[decoder_bias], decoder_bias
    if cfg.tie_word_embeddings:
        state.pop("mlm_head.decoder.weight", None)  # a stored copy of the tied embeddings
    with torch.device("meta"):
        model = EncoderModel(cfg, heads)
    prefixed = any(k.startswith(cfg.family + ".") for k in hf_state)
    check_weights(model.state_dict(), state, source, f"the {cfg.family} encoder",
                  name_of=lambda k: stored_as.get(k) or encoder_key_to_hf(k, cfg.family, prefixed))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


__all__ = ["EncoderConfig", "Encoder", "EncoderModel", "MaskedLMHead", "ClassificationHead", "Pooler", "mean_pool",
           "hf_to_encoder_key", "encoder_key_to_hf", "hf_architecture", "encoder_state_for_hf", "heads_for",
           "load_encoder_state"]
