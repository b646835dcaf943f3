"""Pretraining data: BPE training, corpus sharding, packed windows and document masks.

References: transformers' AutoTokenizer reading the trained folder (same ids, same decode, same chat
rendering; with ``split_special_tokens=True`` it also gives the ids a document's text must get),
JSON parsed here by hand for the documents, and the shard bytes read back with plain numpy.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer
from slmkit.train import corpus as corpus_module
from slmkit.train.bpe import train_bpe
from slmkit.train.corpus import PackedDataset, document_mask, prepare_corpus, read_documents, val_mask

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

VOCAB = 512
AWKWARD = ["", " ", "Hello, world!", "  two leading", "trailing  ", "\n\n\tTabs\r\nand CRLF\r",
           "naïve café Straße Ünïcödé", "日本語のテキスト 中文 한국어", "مرحبا بالعالم עברית", "Привет, мир",
           "🤗 👩‍💻 🇫🇷 emoji", "x²+y² ≤ ∞", "\x00\x01\x7f control \u200b zero-width \ufeff",
           "def f(x):\n    return x ** 2\n", "<|endoftext|> in text <|im_start|>user\nhi<|im_end|>",
           "it's don't THEY'RE 12345678901234567890 3.14159"]


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Strings of random code points from every plane slmkit is likely to meet (no lone surrogates)."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x6FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
              (0xAC00, 0xAD00), (0x1F300, 0x1FAFF), (0xE000, 0xE0FF), (0x10000, 0x1007F)]
    out = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 30)):
            low, high = rng.choice(ranges)
            pieces.append(chr(rng.randint(low, high)) if rng.random() < 0.7 else rng.choice([" ", "\n", " the"]))
        out.append("".join(pieces))
    return out


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain(shared_data) -> Path:
    folder = shared_data / "pretrain_corpus"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present")
    return folder


@pytest.fixture(scope="module")
def bpe_dir(pretrain, tmp_path_factory) -> Path:
    return train_bpe([pretrain / "nltk_inaugural.jsonl"], tmp_path_factory.mktemp("bpe") / "tok",
                     vocab_size=VOCAB)


@pytest.fixture(scope="module")
def small_corpus(pretrain, tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder with a .jsonl (with a blank line), a .json list and a .txt; and its documents in order."""
    folder = tmp_path_factory.mktemp("corpus")
    with (pretrain / "nltk_reuters21578_apte.jsonl").open(encoding="utf-8") as handle:
        news = [json.loads(next(handle))["text"] for _ in range(150)]
    news[7] = "a document that spells <|endoftext|> in the middle and <|im_end|> too"
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(news)]
    lines.insert(20, "   ")
    (folder / "b_news.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    speeches = [json.loads(line)["text"][:3000] for line in
                (pretrain / "nltk_inaugural.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
    (folder / "a_speeches.json").write_text(json.dumps([{"text": t, "n": 1} for t in speeches]), encoding="utf-8")
    play = (pretrain / "tinyshakespeare_input.txt").read_text(encoding="utf-8")[:20000]
    (folder / "c_play.txt").write_text(play, encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus file", encoding="utf-8")
    return folder, speeches + news + [play]


@pytest.fixture(scope="module")
def prepared(small_corpus, bpe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare_corpus(small_corpus[0], bpe_dir, out, workers=1, val_fraction=0.1, seed=3, shard_tokens=5000,
                   progress=False)
    return out


def read_split(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    return np.concatenate([np.fromfile(folder / name, dtype=meta["dtype"]) for name in meta["splits"][split]["files"]])


# ---- BPE --------------------------------------------------------------------------------------
def test_bpe_vocab_specials_and_byte_alphabet(bpe_dir):
    tok = Tokenizer.from_hf_dir(bpe_dir)
    assert tok.vocab_size == VOCAB
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0
    assert not tok.add_bos and not tok.add_eos
    vocab = tok.backend.get_vocab()
    byte_chars = bytes_to_unicode().values()
    assert all(ch in vocab for ch in byte_chars)
    assert len(tok.encode("the people of the United States")) < len("the people of the United States") / 2


def test_bpe_round_trips_and_matches_transformers(bpe_dir):
    tok = Tokenizer.from_hf_dir(bpe_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    assert len(hf) == VOCAB and hf.eos_token == "<|endoftext|>"
    for text in AWKWARD + random_strings(200):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == text
    assert tok.encode("<|im_start|>user")[0] == 1  # special tokens are matched whole


def test_bpe_chat_template_renders_like_transformers(bpe_dir):
    tok = Tokenizer.from_hf_dir(bpe_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🤗"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for prompt in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=prompt)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert ours.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_bpe_rejects_bad_settings(pretrain, tmp_path):
    with pytest.raises(SlmError, match="too small"):
        train_bpe(pretrain / "nltk_inaugural.jsonl", tmp_path / "t", vocab_size=200)
    with pytest.raises(SlmError, match="no such file"):
        train_bpe(tmp_path / "missing.jsonl", tmp_path / "t")
    assert not (tmp_path / "t").exists()


# ---- reading documents ------------------------------------------------------------------------
def test_read_documents_formats_and_folder_order(small_corpus):
    folder, expected = small_corpus
    assert list(read_documents(folder)) == expected
    assert list(read_documents([folder / "c_play.txt", folder / "a_speeches.json"])) == [expected[-1], *expected[:6]]


def test_read_documents_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(SlmError, match=r"bad\.jsonl:3: not valid JSON"):
        list(read_documents(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(SlmError, match=r"nofield\.jsonl:1: no field 'text' \(fields: body\)"):
        list(read_documents(nofield))
    assert list(read_documents(nofield, text_field="body")) == ["x"]
    notlist = tmp_path / "obj.json"
    notlist.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(SlmError, match="expected a JSON list"):
        list(read_documents(notlist))
    with pytest.raises(SlmError, match="no such file or folder"):
        list(read_documents(tmp_path / "nope.jsonl"))
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(SlmError, match="unsupported corpus file type '.csv'"):
        list(read_documents(tmp_path / "table.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmError, match="holds no"):
        list(read_documents(tmp_path / "empty"))


# ---- prepare_corpus ---------------------------------------------------------------------------
def test_prepared_tokens_equal_per_document_encoding(small_corpus, bpe_dir, prepared):
    _, documents = small_corpus
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir), split_special_tokens=True)
    encoded = [hf(text, add_special_tokens=False)["input_ids"] + [0] for text in documents]
    meta = json.loads((prepared / "meta.json").read_text())
    train, val = read_split(prepared, "train"), read_split(prepared, "val")
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(map(len, encoded))
    # every EOS is a document boundary, also where a document's text spells "<|endoftext|>"
    assert (train == 0).sum() == meta["splits"]["train"]["documents"]
    assert (val == 0).sum() == meta["splits"]["val"]["documents"]
    to_val = val_mask(len(documents), 0.1, 3)
    assert train.tolist() == [t for ids, v in zip(encoded, to_val) if not v for t in ids]
    assert val.tolist() == [t for ids, v in zip(encoded, to_val) if v for t in ids]
    assert 3 <= to_val.sum() <= 40
    assert not np.array_equal(to_val, val_mask(len(documents), 0.1, 4))


def test_meta_json(small_corpus, bpe_dir, prepared):
    folder, documents = small_corpus
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB
    assert meta["eos_id"] == 0 and meta["bos_id"] == 0
    assert meta["tokenizer"] == str(bpe_dir.resolve())
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == len(documents) and val["documents"] >= 1
    assert len(train["files"]) == -(-train["tokens"] // 5000) >= 3
    assert train["files"][:2] == ["train_000.bin", "train_001.bin"] and val["files"][0] == "val_000.bin"
    for split in (train, val):
        sizes = [(prepared / name).stat().st_size for name in split["files"]]
        assert sum(sizes) == 2 * split["tokens"] and max(sizes) <= 2 * 5000
    assert [(Path(s["path"]).name, s["documents"]) for s in meta["sources"]] == [
        ("a_speeches.json", 6), ("b_news.jsonl", 150), ("c_play.txt", 1)]
    assert sorted(p.name for p in prepared.iterdir()) == sorted(["meta.json", *train["files"], *val["files"]])


def test_workers_give_byte_identical_shards(small_corpus, bpe_dir, prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_BATCH_DOCS", 8)  # many batches in flight across the pool
    out = tmp_path / "two"
    meta = prepare_corpus(small_corpus[0], Tokenizer.from_hf_dir(bpe_dir), out, workers=2, val_fraction=0.1,
                          seed=3, shard_tokens=5000, progress=False)
    assert meta["tokenizer"] is None
    reference = json.loads((prepared / "meta.json").read_text())
    assert meta["splits"] == reference["splits"]
    for name in meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"]:
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name


def test_failure_leaves_no_folder(small_corpus, bpe_dir, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.jsonl").write_text((small_corpus[0] / "b_news.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    (source / "b.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', encoding="utf-8")
    out = tmp_path / "out" / "shards"
    for workers in (1, 2):
        with pytest.raises(SlmError, match=r"b\.jsonl:3: not valid JSON"):
            prepare_corpus(source, bpe_dir, out, workers=workers, shard_tokens=1000, progress=False)
        assert not out.exists()
        assert list(out.parent.iterdir()) == []  # the partial build folder is gone too


def _die(*args):
    os._exit(3)


def test_dead_worker_is_an_error_not_a_hang(small_corpus, bpe_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_init_worker", _die)
    out = tmp_path / "shards"
    with pytest.raises(SlmError, match="worker process died"):
        prepare_corpus(small_corpus[0], bpe_dir, out, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_prepare_corpus_checks_inputs(small_corpus, bpe_dir, prepared, tmp_path):
    folder = small_corpus[0]
    with pytest.raises(SlmError, match="already exists"):
        prepare_corpus(folder, bpe_dir, prepared, progress=False)
    no_eos = Tokenizer(Tokenizer.from_hf_dir(bpe_dir).backend, {})
    with pytest.raises(SlmError, match="no EOS token"):
        prepare_corpus(folder, no_eos, tmp_path / "x", progress=False)
    with pytest.raises(SlmError, match="at least 2"):
        prepare_corpus(folder / "c_play.txt", bpe_dir, tmp_path / "x", progress=False)
    with pytest.raises(SlmError, match="val_fraction"):
        prepare_corpus(folder, bpe_dir, tmp_path / "x", val_fraction=0.0, progress=False)
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_folder(small_corpus, bpe_dir, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    meta = prepare_corpus(small_corpus[0] / "a_speeches.json", bpe_dir, out, workers=1, val_fraction=0.5,
                          overwrite=True, progress=False)
    assert not (out / "stale.bin").exists()
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_val_mask_always_fills_both_splits():
    assert val_mask(2, 0.001, 0).sum() == 1
    assert val_mask(2, 0.999, 0).sum() == 1
    big = val_mask(100_000, 0.01, 7)
    assert 850 < big.sum() < 1150
    assert np.array_equal(big[:50_000], val_mask(50_000, 0.01, 7))  # a document's fate depends on its index only


# ---- PackedDataset ----------------------------------------------------------------------------
def test_windows_rebuild_the_stream_across_shards(prepared):
    stream = read_split(prepared, "train").astype(np.int64)
    data = PackedDataset(prepared, "train", seq_len=64)
    assert data.num_windows == len(data) == (len(stream) - 1) // 64
    assert data.eos_id == 0 and data.total_tokens == len(stream)
    windows = [data.window(i) for i in range(data.num_windows)]
    assert all(w.dtype == np.int64 and len(w) == 65 for w in windows)
    assert np.array_equal(np.concatenate([w[:-1] for w in windows]), stream[:64 * data.num_windows])
    assert [w[-1] for w in windows] == stream[64:64 * data.num_windows + 1:64].tolist()
    with pytest.raises(IndexError):
        data.window(data.num_windows)


def test_sample_is_a_seeded_permutation_per_epoch(prepared):
    data = PackedDataset(prepared, "train", seq_len=128)
    n = data.num_windows
    everything = sorted(tuple(data.window(i)) for i in range(n))
    epochs = [[tuple(data.sample(k, seed=5)) for k in range(e * n, (e + 1) * n)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == everything  # every window exactly once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    fresh = PackedDataset(prepared, "train", seq_len=128)
    ks = [2 * n + 3, 5, n + 1, 0, 3 * n - 1]  # out of order, across epochs
    assert [tuple(fresh.sample(k, seed=5)) for k in ks] == [epochs[k // n][k % n] for k in ks]
    assert [tuple(data.sample(k, seed=6)) for k in range(n)] != epochs[0]
    assert np.array_equal(data.batch(n - 1, 3, seed=5), np.stack([data.sample(k, seed=5) for k in (n - 1, n, n + 1)]))


def test_packed_dataset_errors(prepared, tmp_path):
    val_tokens = json.loads((prepared / "meta.json").read_text())["splits"]["val"]["tokens"]
    with pytest.raises(SlmError, match="fewer than seq_len"):
        PackedDataset(prepared, "val", seq_len=val_tokens)
    assert PackedDataset(prepared, "val", seq_len=val_tokens - 1).num_windows == 1
    with pytest.raises(SlmError, match="no split 'test'"):
        PackedDataset(prepared, "test")
    with pytest.raises(SlmError, match="no meta.json"):
        PackedDataset(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in prepared.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    with open(broken / "train_001.bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(SlmError, match="incomplete"):
        PackedDataset(broken)


# ---- document_mask ----------------------------------------------------------------------------
def test_document_mask_by_hand():
    eos = 9
    tokens = np.array([4, 5, eos, 6, eos, eos, 7, 8, 1])
    positions, segments = document_mask(tokens, eos)
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 2]
    assert segments.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3]
    assert positions.dtype == segments.dtype == np.int64
    positions, segments = document_mask(np.array([eos, 1, 2]), eos)
    assert positions.tolist() == [0, 0, 1] and segments.tolist() == [0, 1, 1]
    positions, segments = document_mask(np.array([1, 2, 3]), eos)
    assert positions.tolist() == [0, 1, 2] and segments.tolist() == [0, 0, 0]


def test_document_mask_matches_a_loop():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=500)  # eos 0 appears often, also twice in a row
    expected_pos, expected_seg, pos, seg = [], [], 0, 0
    for token in tokens:
        expected_pos.append(pos)
        expected_seg.append(seg)
        pos, seg = (0, seg + 1) if token == 0 else (pos + 1, seg)
    positions, segments = document_mask(tokens, 0)
    assert positions.tolist() == expected_pos and segments.tolist() == expected_seg
