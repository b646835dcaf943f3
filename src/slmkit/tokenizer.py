"""One tokenizer class for every checkpoint slmkit reads, built on the `tokenizers` library.

Sources: a Hugging Face folder (``tokenizer.json`` plus its config files) or a GGUF file's
``tokenizer.ggml.*`` metadata, rebuilt the way llama.cpp reads it and transformers 5.24 converts it
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py``):

* ``gpt2`` files are byte-level BPE; ``tokenizer.ggml.pre`` names the split regexes, copied from
  llama.cpp's ``llm_tokenizer_bpe`` (``src/llama-vocab.cpp``).
* ``llama`` files are SentencePiece vocabularies replayed as BPE with byte fallback; merges come from
  the file, or from the scores (Gemma: from token order), exactly as transformers derives them.
* Tokens typed control (3) become special added tokens, user-defined (4) plain added tokens, so both
  are matched whole in text.

Also here: chat templates rendered like transformers' ``apply_chat_template`` and a streaming
decoder that never emits half of a multi-byte character.
"""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelFileError, SlmError, UnsupportedError

_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
             "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token_type values

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes applied in turn, each to the pieces of the one before.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("default", "gpt-2", "phi-2", "codegen", "mpt", "olmo"), [_GPT2]),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r"), [r"\p{N}", _GPT2]),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), [_LLAMA3]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), [_QWEN2]),
}
# llama.cpp looks a whole word up before merging (and adds BOS by default) for these.
_LLAMA3_FAMILY = {"llama3", "llama-v3", "llama-bpe", "falcon3"}
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


class Tokenizer:
    """Text <-> token ids, special tokens, chat template; the only tokenizer API slmkit uses."""

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str | None], *,
                 chat_template: str | None = None, extra_eos_ids: Iterable[int] = (),
                 model_max_length: int | None = None):
        self._tok = backend
        self.special_tokens = {name: special.get(name) for name in _NAMED}
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            self.token_to_id(self.special_tokens[name]) if self.special_tokens[name] else None
            for name in _NAMED)
        extra = [int(i) for i in extra_eos_ids]
        if self.eos_id is None and extra:
            self.eos_id = extra[0]
        self.eos_ids = {i for i in (self.eos_id, *extra) if i is not None}
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos = probe[:1] == [self.bos_id]
        self.add_eos = len(probe) > int(self.add_bos) and probe[-1] == self.eos_id

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` (or convert ``tokenizer.model``) and the config files beside it.

        As in transformers 5, tokenizer.json's post-processor alone decides BOS/EOS insertion
        (``add_bos_token`` in tokenizer_config.json is ignored), and chat_template.jinja wins over
        the config's ``chat_template``.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: not a folder; expected a model folder with tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        if (folder / "tokenizer.json").is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
                backend.no_padding()  # a file may pin both (MiniLM pads to 128); transformers drops them too
                backend.no_truncation()
            except Exception as exc:
                raise ModelFileError(f"{folder / 'tokenizer.json'}: cannot be read ({exc})") from exc
        elif (folder / "tokenizer.model").is_file():
            backend = _convert_sentencepiece(folder)
        else:
            raise ModelFileError(f"{folder}: no tokenizer.json or tokenizer.model, so no tokenizer can be built")
        special = {name: _token_text(config.get(name, token_map.get(name))) for name in _NAMED}
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos = generation.get("eos_token_id")
        max_len = config.get("model_max_length")
        return cls(backend, special, chat_template=template,
                   extra_eos_ids=eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [],
                   model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Read a GGUF file's header and build its tokenizer."""
        from .formats.gguf import GGUFFile
        return cls.from_gguf_metadata(GGUFFile(path).metadata)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes from its ``tokenizer.ggml.*`` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ModelFileError("GGUF metadata has no tokenizer.ggml.tokens; the file carries no tokenizer")
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if kind == "gpt2":
            backend = _byte_level_bpe(meta, tokens, pre)
        elif kind == "llama":
            backend = _sentencepiece_bpe(meta, tokens, str(meta.get("general.architecture", "")))
        else:
            raise UnsupportedError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
        _add_typed_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [], kind == "gpt2")
        special = {}
        for name, key in _GGUF_IDS.items():
            index = meta.get(f"tokenizer.ggml.{key}")
            special[name] = tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None
        named = [AddedToken(t, normalized=False, special=True) for t in special.values() if t]
        backend.add_special_tokens(named)
        default_bos = kind == "llama" or pre in _LLAMA3_FAMILY
        _set_post_processor(backend, special, bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                            bool(meta.get("tokenizer.ggml.add_eos_token", False)))
        end_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        context = meta.get(f"{meta.get('general.architecture')}.context_length")
        return cls(backend, special, chat_template=meta.get("tokenizer.chat_template"),
                   extra_eos_ids=[i for i in end_ids if isinstance(i, int)],
                   model_max_length=int(context) if isinstance(context, int) else None)

    # ---- using ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS/EOS are added only where the checkpoint asks for them."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, index: int) -> str | None:
        return self._tok.id_to_token(index)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self) -> list[bytes | None]:
        """Every token id's bytes, as they appear in generated text; None for special tokens.

        Byte-level BPE tokens map back through GPT-2's byte alphabet (a token may hold part of a UTF-8
        character); SentencePiece pieces turn ``▁`` into a space and ``<0xHH>`` into that byte; other
        tokens are decoded alone (None where that gives half a character). Computed once, then cached.
        """
        cached = getattr(self, "_token_bytes_cache", None)
        if cached is not None:
            return cached
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        added = self._tok.get_added_tokens_decoder()
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            data: bytes | None = None
            if i in added:
                text = None if added[i].special else self._tok.decode([i], skip_special_tokens=False)
                data = text.encode("utf-8") if text and "\ufffd" not in text else None
            elif token is None:
                data = None
            elif "ByteLevel" in kinds:
                data = bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) else None
            elif "ByteFallback" in kinds and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                data = bytes([int(token[3:5], 16)])
            elif "Replace" in kinds or "Metaspace" in kinds:
                data = token.replace("\u2581", " ").encode("utf-8")
            else:
                text = self._tok.decode([i], skip_special_tokens=False)
                data = text.encode("utf-8") if "\ufffd" not in text else None
            out.append(data or None)
        self._token_bytes_cache = out
        return out

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's own Jinja chat template, as transformers does (tokenize=False)."""
        if not self.chat_template:
            raise SlmError("this model has no chat template; prompt it with plain text instead")
        context = {name: value for name, value in self.special_tokens.items() if value is not None}
        context.update(kwargs)
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        try:
            return _compile_template(self.chat_template).render(
                messages=_clean_messages(messages), add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as exc:
            raise SlmError(f"chat template failed: {exc}") from exc

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that transformers.AutoTokenizer can load."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                                  "add_eos_token": self.add_eos, "clean_up_tokenization_spaces": False}
        config.update({name: value for name, value in self.special_tokens.items() if value is not None})
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")


class IncrementalDecoder:
    """Turns ids fed one at a time into text deltas whose concatenation equals the full decode.

    Text is decoded over a short window (from the last emitted boundary); while it ends in U+FFFD,
    the replacement for an unfinished UTF-8 sequence, nothing is emitted. ``flush`` returns the rest.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window start, and end of what has been emitted

    def _text(self, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[self._prefix:stop], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        before, now = self._text(self._read), self._text()
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        before, now = self._text(self._read), self._text()
        self._prefix = self._read = len(self._ids)
        return now[len(before):]


# ---- GGUF builders --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte, the alphabet of byte-level vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _byte_level_bpe(meta: dict, tokens: list[str], pre: str) -> tokenizers.Tokenizer:
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UnsupportedError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported "
                               f"(supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelFileError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                       ignore_merges=pre in _LLAMA3_FAMILY))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_SPLITS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first (transformers' generate_merges)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(meta: dict, tokens: list[str], arch: str) -> tokenizers.Tokenizer:
    """SentencePiece vocabulary (llama, TinyLlama, Gemma, Phi-3) as byte-fallback BPE."""
    gemma = arch in _GEMMA_ARCHS
    if gemma:  # Gemma stores whitespace-only tokens with real spaces and its merge order is file order
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ([tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
              if meta.get("tokenizer.ggml.merges") else _merges_from_scores(vocab, scores))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if gemma and isinstance(unk_id, int) else None
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                       unk_token=unk))
    replay = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        replay.append(decoders.Strip(" ", 1, 0))
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                         prepend_scheme="first" if prefix else "never")
        replay += [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence(replay)
    return backend


def _add_typed_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int], byte_level: bool):
    """Control tokens become special added tokens, user-defined ones plain added tokens."""
    alphabet = set(_bytes_to_unicode().values())
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == _CONTROL and t and (not byte_level or set(t) <= alphabet)]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=False)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
                        if kind == _USER_DEFINED and t in vocab])


def _set_post_processor(backend: tokenizers.Tokenizer, special: dict, add_bos: bool, add_eos: bool):
    """BOS/EOS insertion, built the way transformers' ``update_post_processor`` builds it."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    pairs = [(bos, backend.token_to_id(bos))] if add_bos else []
    pairs += [(eos, backend.token_to_id(eos))] if add_eos else []
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)


# ---- Hugging Face folders -------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as written in the config files: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _convert_sentencepiece(folder: Path) -> tokenizers.Tokenizer:
    """Convert a folder that has only ``tokenizer.model``, through transformers' converter."""
    missing = [name for name in ("sentencepiece", "google.protobuf", "transformers") if not _importable(name)]
    if missing:
        raise UnsupportedError(f"{folder}: has only tokenizer.model (SentencePiece); converting it needs "
                               f"{', '.join(missing)} installed, or ship a tokenizer.json")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ---- chat templates -------------------------------------------------------------------------
def _clean_messages(messages: list[dict]) -> list[dict]:
    """Drop None-valued keys and alias reasoning fields, as transformers does before rendering."""
    cleaned = []
    for message in messages:
        message = {key: value for key, value in dict(message).items() if value is not None}
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        cleaned.append(message)
    return cleaned


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """A sandboxed Jinja environment with the helpers transformers gives chat templates."""
    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` only marks assistant text; render its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
