"""A tokenizer as GGUF ``tokenizer.ggml.*`` metadata, the form llama.cpp (and ``Tokenizer.from_gguf``) reads.

A model that came from a GGUF file keeps its file's tokenizer keys as they were. Any other tokenizer is
converted from its ``tokenizers`` definition, the inverse of what ``Tokenizer.from_gguf_metadata`` builds:

* byte-level BPE -> ``gpt2``: tokens in GPT-2's byte spelling, merges, token types (control for special
  added tokens, user-defined for the other added ones); ``tokenizer.ggml.pre`` names the split regexes,
  found by matching the tokenizer's pre-tokenizer against the regex sets llama.cpp knows;
* BPE with byte fallback (SentencePiece replayed as BPE) -> ``llama``: pieces, scores that rank the pieces
  in merge order (llama.cpp's SentencePiece tokenizer merges the best-scored pair first, so this replays
  the BPE), byte tokens typed as bytes.

A vocabulary shorter than the embedding table is padded with unused ``[PAD<i>]`` tokens, as llama.cpp's
converter pads it.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UnsupportedError
from ..tokenizer import PRE_TOKENIZER_SPLITS, Tokenizer
from .gguf_write import FLOAT32, INT32, UINT32, Typed

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# the names written for each regex set: the canonical llama.cpp name of each (first wins on a tie)
PREFERRED_PRE = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_GPT2_BYTE_LEVEL_REGEX = PRE_TOKENIZER_SPLITS["gpt-2"]


def copied_tokenizer_metadata(source_metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer.*`` keys of a GGUF file's metadata, typed as they are read back."""
    out: dict[str, Any] = {}
    for key, value in source_metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if key == "tokenizer.ggml.token_type":
            value = Typed(list(value), INT32)
        elif key == "tokenizer.ggml.scores":
            value = Typed([float(v) for v in value], FLOAT32)
        elif key.endswith("_token_id"):
            value = Typed(int(value), UINT32)
        out[key] = value
    return out


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer metadata for ``tokenizer``, its token list padded to ``vocab_size``."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"GGUF export needs a BPE tokenizer; this one is {model.get('type')!r}")
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    vocab = dict(model["vocab"])
    n = max([*vocab.values(), *added.keys()]) + 1
    if n > vocab_size:
        raise UnsupportedError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    tokens: list[str | None] = [None] * vocab_size
    for piece, index in vocab.items():
        tokens[index] = piece
    for index, token in added.items():
        tokens[index] = token["content"]
    types = [NORMAL] * vocab_size
    for index, token in added.items():
        types[index] = CONTROL if token.get("special") else USER_DEFINED
    for i, piece in enumerate(tokens):
        if piece is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    if model.get("byte_fallback"):
        meta = _sentencepiece(spec, tokens, types, merges, model)
    else:
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer")),
                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": Typed(types, INT32),
                "tokenizer.ggml.merges": merges}
    for name, key in (("bos_id", "bos"), ("eos_id", "eos"), ("unk_id", "unknown"), ("pad_id", "padding")):
        index = getattr(tokenizer, name)
        if index is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = Typed(int(index), UINT32)
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(tokenizer.add_eos)
    extra_eos = sorted(tokenizer.eos_ids - {tokenizer.eos_id})
    if extra_eos:
        meta["tokenizer.ggml.eot_token_id"] = Typed(int(extra_eos[0]), UINT32)
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _split_regexes(pre: dict | None) -> tuple[list[str], bool]:
    """The Split regexes of a pre-tokenizer, in order, and whether it ends in a ByteLevel step."""
    if not pre:
        return [], False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    regexes, byte_level = [], False
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern") or {}
            regexes.append(pattern.get("Regex") or pattern.get("String") or "")
        elif kind == "ByteLevel":
            byte_level = True
            if step.get("use_regex", True):
                regexes.extend(_GPT2_BYTE_LEVEL_REGEX)
        elif kind == "Digits" and step.get("individual_digits"):
            regexes.append(r"\p{N}")
        else:
            raise UnsupportedError(f"GGUF export: pre-tokenizer step {kind!r} has no llama.cpp equivalent")
    return regexes, byte_level


def _pre_name(pre: dict | None) -> str:
    regexes, byte_level = _split_regexes(pre)
    if not byte_level:
        raise UnsupportedError("GGUF export: a BPE tokenizer without byte-level pre-tokenization or byte "
                               "fallback cannot be written for llama.cpp")
    for name in PREFERRED_PRE:
        if PRE_TOKENIZER_SPLITS[name] == regexes:
            return name
    for name, known in PRE_TOKENIZER_SPLITS.items():
        if known == regexes:
            return name
    raise UnsupportedError(f"GGUF export: the tokenizer's split regexes {regexes} match none of the "
                           f"pre-tokenizers llama.cpp knows ({', '.join(sorted(PRE_TOKENIZER_SPLITS))})")


def _sentencepiece(spec: dict, tokens: list[str], types: list[int], merges: list[str], model: dict) -> dict:
    rank = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    scores = [-float(rank.get(piece, len(merges))) for piece in tokens]
    for i, piece in enumerate(tokens):
        if types[i] == NORMAL and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[i] = BYTE
    unk = model.get("unk_token")
    if unk is not None and unk in tokens:
        types[tokens.index(unk)] = UNKNOWN
    text = json.dumps(spec.get("normalizer")) + json.dumps(spec.get("pre_tokenizer"))
    space_prefix = '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": Typed(scores, FLOAT32), "tokenizer.ggml.token_type": Typed(types, INT32),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_space_prefix": space_prefix}
