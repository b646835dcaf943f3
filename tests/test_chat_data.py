"""Chat SFT data against the real SmolLM2 tokenizer, the real instruction files and transformers."""

import copy
import json

import numpy as np
import pytest
import torch

from slmkit.errors import SlmError
from slmkit.formats.gguf import GGUFFile
from slmkit.tokenizer import Tokenizer
from slmkit.train.chat_data import (ChatDataset, build_chat_dataset, load_conversations,
                                    tokenize_conversation)

END = "<|im_end|>"
# SmolLM2's template with {% generation %} around each assistant turn's text and end marker, so that
# transformers' return_assistant_tokens_mask gives a reference for the labels.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def instruction(shared_data):
    folder = shared_data / "instruction"
    if not (folder / "lima.json").is_file():
        pytest.skip(f"{folder} has no lima.json")
    return folder


@pytest.fixture(scope="module")
def lima_multi_turn(instruction):
    """LIMA conversations with history, plus the first of them again under a system message."""
    conversations = [c for c in load_conversations(instruction / "lima.json") if len(c) > 2]
    with_system = [{"role": "system", "content": "Answer like a patient teacher."}] + conversations[0]
    return conversations + [with_system]


def label_runs(labels):
    """The contiguous stretches of labelled token ids."""
    runs, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


def test_labels_are_the_assistant_turns_with_their_end_marker(tok, lima_multi_turn):
    assert len(lima_multi_turn) >= 20
    for messages in lima_multi_turn:
        example = tokenize_conversation(tok, messages, max_len=100_000)
        expected = [m["content"] + END for m in messages if m["role"] == "assistant"]
        assert [tok.decode(run) for run in label_runs(example["labels"])] == expected
        text = tok.apply_chat_template(messages, add_generation_prompt=False)
        assert example["input_ids"] == tok.encode(text, add_special_tokens=False)
        assert all(label in (-100, token) for label, token in zip(example["labels"], example["input_ids"]))
    assert "Answer like a patient teacher." in tok.decode(example["input_ids"])  # the system one ran last


def test_input_ids_equal_transformers_apply_chat_template(tok, hf_tok, instruction, lima_multi_turn):
    alpaca = load_conversations(instruction / "llamafactory_alpaca_en_demo.json")[:20]
    for messages in alpaca + lima_multi_turn:
        reference = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                               return_dict=True)["input_ids"]
        assert tokenize_conversation(tok, messages, max_len=100_000)["input_ids"] == reference


def test_labels_equal_transformers_assistant_mask(tok, hf_tok, lima_multi_turn):
    marked = copy.copy(tok)
    marked.chat_template = MARKED_TEMPLATE
    for messages in lima_multi_turn[:8] + lima_multi_turn[-1:]:
        assert (marked.apply_chat_template(messages, add_generation_prompt=False)
                == tok.apply_chat_template(messages, add_generation_prompt=False))
        reference = hf_tok.apply_chat_template(messages, chat_template=MARKED_TEMPLATE, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        example = tokenize_conversation(tok, messages, max_len=100_000)
        assert example["input_ids"] == reference["input_ids"]
        assert [int(label != -100) for label in example["labels"]] == reference["assistant_masks"]


def test_bos_added_when_the_tokenizer_adds_one_and_the_template_does_not(smollm2_gguf):
    meta = dict(GGUFFile(smollm2_gguf).metadata)
    meta.update({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 0})  # <|endoftext|>
    tok = Tokenizer.from_gguf_metadata(meta)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = tokenize_conversation(tok, messages, max_len=1000)
    assert example["input_ids"] == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert example["input_ids"][0] == 0 and example["labels"][0] == -100
    assert [tok.decode(run) for run in label_runs(example["labels"])] == ["Hello!" + END]


def test_template_that_is_not_prefix_stable_is_named(tok):
    unstable = copy.copy(tok)
    unstable.chat_template = ("{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] + ': ' + "
                              "m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(SlmError, match="not prefix-stable"):
        tokenize_conversation(unstable, messages, max_len=100)


def test_alpaca_and_lima_files_are_read(instruction):
    path = instruction / "llamafactory_alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    conversations = load_conversations(path)
    assert len(conversations) == len(raw)
    for record, messages in zip(raw, conversations):
        user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
        assert messages == [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    assert any(record["input"] for record in raw)

    raw = json.loads((instruction / "lima.json").read_text(encoding="utf-8"))
    lima = load_conversations(instruction / "lima.json", system="Be brief.")
    record, messages = next((r, m) for r, m in zip(raw, lima) if len(r["history"]) >= 2)
    expected = [{"role": "system", "content": "Be brief."}]
    for user, assistant in record["history"]:
        expected += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    expected += [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    assert messages == expected


def test_sharegpt_messages_and_jsonl_forms(tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}]))
    assert load_conversations(sharegpt, system="ignored: the record has one") == [[
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]]

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
                     + "\n\n" + json.dumps({"instruction": "Do", "input": "this", "output": "Done"}) + "\n")
    assert load_conversations(mixed, system="Sys") == [
        [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Do\n\nthis"},
         {"role": "assistant", "content": "Done"}]]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "x", "completion": "y"}, "unknown format"),
    ({"instruction": "x", "input": "", "output": 3}, "'output' must be a string"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker 'robot'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "must start with a user message"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, r"history\[0\]"),
])
def test_bad_record_names_file_and_index(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    with pytest.raises(SlmError, match=rf"data\.jsonl: record 2 \(line 3\): .*{message}"):
        load_conversations(path)
    listed = tmp_path / "data.json"
    listed.write_text(json.dumps([good, bad]))
    with pytest.raises(SlmError, match=rf"data\.json: record 1: .*{message}"):
        load_conversations(listed)


def test_truncation_keeps_the_start_and_drops_examples_without_labels(tok, tmp_path):
    messages = [{"role": "user", "content": "Name three colours."},
                {"role": "assistant", "content": "Red, green and blue."}]
    full = tokenize_conversation(tok, messages, max_len=10_000)
    for max_len in (5, len(full["input_ids"]) - 3):
        cut = tokenize_conversation(tok, messages, max_len=max_len)
        assert cut == {"input_ids": full["input_ids"][:max_len], "labels": full["labels"][:max_len]}

    path = tmp_path / "data.jsonl"
    records = [{"instruction": "word " * 200, "input": "", "output": "long prompt"},
               {"instruction": "Hi", "input": "", "output": "Hello"}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    train, val = build_chat_dataset(path, tok, max_len=64, val_fraction=0.0)
    assert (len(train), train.dropped, len(val)) == (1, 1, 0)
    assert [tok.decode(run) for run in label_runs(train.examples[0]["labels"])] == ["Hello" + END]


def test_collate_pads_right_with_ignored_labels():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = ChatDataset.collate(samples, pad_id=2)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_sample_draws_a_permutation_per_epoch():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(7)]
    data = ChatDataset(examples)
    for epoch in range(3):
        drawn = [data.sample(epoch * 7 + j, seed=4)["input_ids"][0] for j in range(7)]
        assert drawn == np.random.default_rng([4, epoch]).permutation(7).tolist()
    assert [data.sample(k, seed=4) for k in range(7)] != [data.sample(k, seed=5) for k in range(7)]


def test_split_is_deterministic_and_disjoint(tok, tmp_path):
    path = tmp_path / "numbered.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Q{i}", "input": "", "output": f"A{i}"}) for i in range(40)))

    def answers(data):
        return [tok.decode(label_runs(e["labels"])[0]) for e in data.examples]

    train, val = build_chat_dataset(path, tok, max_len=256, val_fraction=0.1, seed=3)
    assert (len(train), len(val), train.dropped, val.dropped) == (36, 4, 0, 0)
    assert sorted(answers(train) + answers(val)) == sorted(f"A{i}{END}" for i in range(40))
    again_train, again_val = build_chat_dataset(path, tok, max_len=256, val_fraction=0.1, seed=3)
    assert again_train.examples == train.examples and again_val.examples == val.examples
    _, other_val = build_chat_dataset(path, tok, max_len=256, val_fraction=0.1, seed=4)
    assert sorted(answers(other_val)) != sorted(answers(val))
