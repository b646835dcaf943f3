"""Parts of the encoder training tasks (``train/tasks/mlm.py``: RoBERTa masked-LM pretraining, and
``train/tasks/classify.py``: sequence classification): batches, losses, tokenizer, init, heads and saver.

RoBERTa's MLM recipe (Liu et al. 2019): FULL-SENTENCES inputs (packed windows of contiguous text that may
cross document boundaries, ``</s>`` between documents, wrapped ``<s> ... </s>``), no next-sentence
prediction, and dynamic masking: 15% of the non-special tokens are chosen afresh every time a sample is
fed, 80% of them become ``<mask>``, 10% a random token, 10% stay; AdamW with betas (0.9, 0.98), eps 1e-6.

Every batch is a function of the global sample indices and the seed only (the mask of sample ``k`` is drawn
from a generator seeded with ``(seed, k)``), so epoch 2 masks differently from epoch 1 and a resumed run
exactly as the uninterrupted one. Classification reads labelled text files (GLUE-style TSV / CSV with a
header, JSON Lines, a JSON list), tokenizes ``<s> text </s>`` with the encoder's own tokenizer and trains a
fresh classification head (kept when the checkpoint already has one of the same size, as transformers
does); at the end it writes ``eval.json`` with the accuracy on the whole validation set. Both tasks save
the model in the Hugging Face layout (``RobertaForMaskedLM`` / ``RobertaForSequenceClassification``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import tokenizers
from tokenizers import AddedToken, processors
from torch import nn

from ..api.encoder import EncoderLM, special_tokens_of
from ..errors import SlmError
from ..models.encoder import EncoderConfig, EncoderModel
from ..tokenizer import Tokenizer
from .bpe import train_bpe
from .config import TrainConfig
from .distributed import Dist
from .epochs import EpochOrder
from .common import data_path, on_main_then_all, scratch_vocab_size
from .corpus import val_mask

IGNORE = -100
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, as in roberta-base
_TRAIN_STREAM, _VAL_STREAM = 0, 1  # keeps the masks of train sample k and val window k apart


# ------------------------------------------------------------------------------------------- masking
def mask_tokens(ids: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT / RoBERTa masking of a token array: ``(inputs, labels)``.

    Each non-special token is chosen with probability ``prob``; a chosen token becomes ``mask_id`` (80%),
    a random token (10%) or stays (10%), and keeps its id as the label; every other label is -100.
    Random tokens are drawn uniformly from the non-special ids below ``vocab_size`` (fairseq's RoBERTa;
    transformers' collator draws from the whole vocabulary, specials included).
    """
    if not 0.0 < prob < 1.0:
        raise SlmError(f"mask probability must be between 0 and 1 (exclusive), got {prob}")
    ids = np.asarray(ids, dtype=np.int64)
    specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
    if vocab_size - len(specials) < 1:
        raise SlmError(f"a vocabulary of {vocab_size} holds no token that is not special")
    chosen = (rng.random(ids.shape) < prob) & ~np.isin(ids, specials)
    labels = np.where(chosen, ids, IGNORE)
    roll = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (roll < 0.8)] = mask_id
    randomised = chosen & (roll >= 0.8) & (roll < 0.9)
    draws = rng.integers(0, vocab_size - len(specials), int(randomised.sum()))
    for s in specials:  # the r-th non-special id: step over each special id at or below it
        draws += draws >= s
    inputs[randomised] = draws
    return inputs, labels


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Every id the tokenizer marks special (``<s>``, ``</s>``, ``<pad>``, ``<mask>``...): never masked."""
    ids = {i for i, tok in tokenizer.backend.get_added_tokens_decoder().items() if tok.special}
    ids |= {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) if i is not None}
    return sorted(ids)


class MLMBatches:
    """FULL-SENTENCES masked-LM batches: ``<s> window </s>`` rows of ``dataset.seq_len + 2`` tokens.

    ``dataset`` is a :class:`~slmkit.train.corpus.PackedDataset` whose windows are the text of a row (its
    document separator, the corpus's EOS, becomes ``sep_id``); the mask is drawn per sample from
    ``(seed, k)``. ``shuffle=False`` serves window ``k`` itself (validation: the same mask every time).
    """

    def __init__(self, dataset, seed: int, cls_id: int, sep_id: int, mask_id: int, vocab_size: int,
                 special_ids: Sequence[int], mask_prob: float = 0.15, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.cls_id, self.sep_id, self.mask_id, self.vocab_size = cls_id, sep_id, mask_id, vocab_size
        self.special_ids, self.mask_prob = sorted(set(special_ids) | {cls_id, sep_id}), mask_prob
        self.stream = _TRAIN_STREAM if shuffle else _VAL_STREAM

    def row(self, k: int) -> np.ndarray:
        """The unmasked input of sample ``k``: ``<s>``, ``seq_len`` text tokens, ``</s>``."""
        window = (self.dataset.sample(k, self.seed) if self.shuffle else self.dataset.window(k))[:-1]
        eos = self.dataset.eos_id
        if eos is not None and eos != self.sep_id:
            window = np.where(window == eos, self.sep_id, window)
        return np.concatenate([[self.cls_id], window, [self.sep_id]]).astype(np.int64)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        inputs, labels = [], []
        for k in indices:
            rng = np.random.default_rng([self.seed, self.stream, int(k)])
            x, y = mask_tokens(self.row(k), rng, self.vocab_size, self.mask_id, self.special_ids, self.mask_prob)
            inputs.append(x)
            labels.append(y)
        return {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels))}


class MaskedLMLoss(nn.Module):
    """(sum of cross-entropy over the labelled positions, their count) for an encoder with an MLM head;
    the vocabulary projection runs on the labelled positions only."""

    def __init__(self, model: EncoderModel):
        super().__init__()
        if model.mlm_head is None:
            raise SlmError("masked-LM training needs an encoder with an MLM head")
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(input_ids, attention_mask, token_type_ids)
        keep = labels != IGNORE
        logits = self.model.mlm_head(hidden[keep], self.model.encoder.embeddings.word.weight)
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), keep.sum()


# ------------------------------------------------------------------------------------ classification
def read_labelled(path: str | Path, text_column: str | None = None,
                  label_column: str = "label") -> list[tuple[str, str, str]]:
    """``(text, raw label, where)`` for every example of a labelled file.

    ``.tsv`` / ``.csv``: a header row names the columns (GLUE's ``sentence\\tlabel``; TSV fields are not
    quoted); ``.jsonl`` / ``.json``: objects (a list of them for .json). ``text_column`` defaults to
    ``sentence`` or ``text``, whichever the file has. Texts are stripped of surrounding whitespace.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SlmError(f"{path}: not UTF-8 text ({exc})") from None
    if suffix in (".tsv", ".csv"):
        reader = csv.DictReader(io.StringIO(content), delimiter="\t" if suffix == ".tsv" else ",",
                                quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
        records = [(f"{path}:{n}", r) for n, r in enumerate(reader, start=2)]
    elif suffix == ".jsonl":
        records = []
        for n, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{n}", json.loads(line)))
                except ValueError as exc:
                    raise SlmError(f"{path}:{n}: not valid JSON ({exc})") from None
    elif suffix == ".json":
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise SlmError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise SlmError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        records = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    else:
        raise SlmError(f"{path}: unsupported file type {suffix or '(none)'!r} for labelled examples; "
                       f"expected .tsv, .csv, .jsonl or .json")
    if not records:
        raise SlmError(f"{path}: no examples")
    examples = []
    for where, record in records:
        if not isinstance(record, dict):
            raise SlmError(f"{where}: expected an object with text and label fields, got {type(record).__name__}")
        column = text_column or next((c for c in ("sentence", "text") if c in record), "sentence")
        for name in (column, label_column):
            if record.get(name) is None:
                raise SlmError(f"{where}: no field {name!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                               f"set data.text_column / data.label_column")
        if not isinstance(record[column], str):
            raise SlmError(f"{where}: field {column!r} is {type(record[column]).__name__}, not text")
        examples.append((record[column].strip(), str(record[label_column]).strip(), where))
    return examples


def label_index(raw: str, num_labels: int, names: Sequence[str], where: str) -> int:
    """A label's class index: an integer in ``0..num_labels-1``, or one of the label ``names``."""
    if raw in names:
        return list(names).index(raw)
    try:
        value = int(raw)
    except ValueError:
        known = f"one of {', '.join(names)}" if names else "an integer (or name the classes in model.labels)"
        raise SlmError(f"{where}: label {raw!r} is not {known}") from None
    if not 0 <= value < num_labels:
        raise SlmError(f"{where}: label {value} is outside 0..{num_labels - 1} (model.num_labels is {num_labels})")
    return value


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens (``<s> ... </s>``), truncated to ``max_length``."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length)
    return [e.ids for e in backend.encode_batch(texts)]


class ClassifyBatches:
    """Right-padded batches of ``(token ids, label)`` examples in a per-epoch permutation."""

    def __init__(self, examples: list[tuple[list[int], int]], seed: int, pad_id: int, shuffle: bool = True):
        if not examples:
            raise SlmError("no classification examples")
        self.examples, self.seed, self.pad_id, self.shuffle = examples, seed, pad_id, shuffle
        self.order = EpochOrder(len(examples))

    def __len__(self) -> int:
        return len(self.examples)

    def _pick(self, k: int) -> tuple[list[int], int]:
        if not self.shuffle:
            return self.examples[k]
        return self.examples[self.order(k, self.seed)]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        picked = [self._pick(k) for k in indices]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.full((len(picked), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for row, (tokens, _) in enumerate(picked):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        labels = torch.tensor([label for _, label in picked], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": mask.sum()}


class ClassificationLoss(nn.Module):
    """(sum of cross-entropy over the examples, number of examples) for an encoder with a classifier head."""

    def __init__(self, model: EncoderModel):
        super().__init__()
        if model.classifier is None:
            raise SlmError("classification training needs an encoder with a classification head")
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.classify(input_ids, attention_mask, token_type_ids)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), (labels != IGNORE).sum()


@torch.no_grad()
def classification_metrics(model: EncoderModel, source: ClassifyBatches, batch_size: int = 32) -> dict:
    """Accuracy and mean loss of ``model`` on every example of ``source`` (in eval mode, fp32)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for start in range(0, len(source), batch_size):
        batch = source.batch(list(range(start, min(start + batch_size, len(source)))))
        logits = model.classify(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        labels = batch["labels"].to(device)
        correct += int((logits.argmax(-1) == labels).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    return {"examples": len(source), "accuracy": correct / len(source), "loss": loss / len(source)}


# ------------------------------------------------------------------------------------------ building
def init_encoder(module: nn.Module, std: float) -> None:
    """transformers' BERT / RoBERTa init: normal(0, std) matrices and embeddings (the padding row zero),
    zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    head = getattr(module, "mlm_head", None)
    if head is not None:
        nn.init.zeros_(head.bias)


@dataclasses.dataclass
class EncoderVocab:
    """The encoder's tokenizer and the ids its batches need."""
    tokenizer: Tokenizer
    special: dict[str, str]  # cls_token / sep_token / mask_token, written to tokenizer_config.json
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int | None


def encoder_vocab(folder: Path) -> EncoderVocab:
    tokenizer = Tokenizer.from_hf_dir(folder)
    special = special_tokens_of(folder)
    cls_id = tokenizer.token_to_id(special["cls_token"]) if "cls_token" in special else tokenizer.bos_id
    sep_id = tokenizer.token_to_id(special["sep_token"]) if "sep_token" in special else tokenizer.eos_id
    mask_id = tokenizer.token_to_id(special["mask_token"]) if "mask_token" in special else None
    if cls_id is None or sep_id is None or tokenizer.pad_id is None:
        raise SlmError(f"{folder}: an encoder's tokenizer needs cls (or bos), sep (or eos) and pad tokens "
                       f"in tokenizer_config.json")
    return EncoderVocab(tokenizer, special, cls_id, sep_id, tokenizer.pad_id, mask_id)


def train_encoder_bpe(corpus, folder: Path, vocab_size: int, text_field: str = "text") -> Path:
    """A byte-level BPE with RoBERTa's special tokens and post-processor (``<s> A </s>``, pairs
    ``<s> A </s></s> B </s>``), written whole or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        train_bpe(corpus, tmp, vocab_size=vocab_size, text_field=text_field, special_tokens=ROBERTA_SPECIALS,
                  chat_template=None)
        backend = tokenizers.Tokenizer.from_file(str(tmp / "tokenizer.json"))
        # <mask> takes the space before it, as roberta-base's does: "a <mask>" stands where "a Ġword" would
        backend.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
        backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                              ("<s>", backend.token_to_id("<s>")),
                                                              trim_offsets=False, add_prefix_space=False)
        Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                            "pad_token": "<pad>"}).save(tmp)
        config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.update(cls_token="<s>", sep_token="</s>", mask_token="<mask>")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def encoder_tokenizer(cfg: TrainConfig, d: Dist) -> Path:
    if cfg.model.tokenizer:
        folder = Path(cfg.model.tokenizer)
        if not (folder / "tokenizer.json").is_file():
            raise SlmError(f"model.tokenizer: {folder} is not a tokenizer folder (no tokenizer.json)")
        return folder
    if cfg.task != "mlm":
        raise SlmError("config: a classifier from scratch needs model.tokenizer (e.g. the pretraining run's "
                       "tokenizer folder)")
    if not cfg.data.corpus:
        raise SlmError("config: a tokenizer is trained on data.corpus; set it or give model.tokenizer")
    folder = Path(cfg.out_dir) / "tokenizer"
    on_main_then_all(d, lambda: train_encoder_bpe(cfg.data.corpus, folder, cfg.model.tokenizer_vocab_size,
                                                   cfg.data.text_field),
                      lambda: (folder / "tokenizer.json").is_file())
    return folder


def scratch_encoder(cfg: TrainConfig, vocab: EncoderVocab, heads: tuple[str, ...]) -> EncoderModel:
    fields = dict(cfg.model.config)
    family = fields.get("family", "roberta")
    roberta = family == "roberta"
    defaults = {"family": family, "position_style": "roberta" if roberta else "absolute",
                "type_vocab_size": 1 if roberta else 2, "layer_norm_eps": 1e-5 if roberta else 1e-12,
                "max_position_embeddings": 514 if roberta else 512}
    tok = vocab.tokenizer
    size = scratch_vocab_size(fields, tok.vocab_size)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "num_labels", "id2label"):
        if key in fields:
            raise SlmError(f"model.config.{key}: set by the tokenizer and model.num_labels / model.labels")
    try:
        model_cfg = EncoderConfig(**{**defaults, **fields}, vocab_size=size, pad_token_id=vocab.pad_id,
                                  bos_token_id=vocab.cls_id, eos_token_id=vocab.sep_id, **_label_fields(cfg))
    except TypeError as exc:
        raise SlmError(f"model.config: {exc}") from None
    torch.manual_seed(cfg.run.seed)
    model = EncoderModel(model_cfg, heads)
    init_encoder(model, cfg.model.init_std)
    return model


def _label_fields(cfg: TrainConfig) -> dict:
    names = list(cfg.model.labels or [])
    if cfg.model.num_labels < 2:
        raise SlmError(f"model.num_labels must be at least 2, got {cfg.model.num_labels}")
    if names and len(names) != cfg.model.num_labels:
        raise SlmError(f"model.labels names {len(names)} classes, model.num_labels is {cfg.model.num_labels}")
    return {"num_labels": cfg.model.num_labels, "id2label": dict(enumerate(names))}


def load_encoder_to_train(cfg: TrainConfig):
    from ..api import load  # the whole runtime: only when a checkpoint is read

    lm = load(cfg.model.init)
    if not isinstance(lm, EncoderLM):
        raise SlmError(f"{cfg.model.init}: task {cfg.task} trains a BERT / RoBERTa encoder; this is not one")
    return lm


def with_heads(model: EncoderModel, heads: tuple[str, ...], cfg: TrainConfig) -> EncoderModel:
    """The same encoder with exactly ``heads``: heads the checkpoint has (of the right shape) are kept,
    new ones are initialised; a BERT pooler becomes the classifier's dense layer, as in transformers."""
    model_cfg = model.cfg
    if "classifier" in heads:
        model_cfg = dataclasses.replace(model_cfg, **_label_fields(cfg))
    torch.manual_seed(cfg.run.seed)
    out = EncoderModel(model_cfg, heads).to(model.dtype)
    init_encoder(out, cfg.model.init_std)
    out.encoder.load_state_dict(model.encoder.state_dict())
    if out.mlm_head is not None and model.mlm_head is not None:
        out.mlm_head.load_state_dict(model.mlm_head.state_dict())
    if out.classifier is not None:
        dense = model.classifier.dense if model.classifier is not None else \
            model.pooler.dense if model.pooler is not None and model_cfg.family == "bert" else None
        if dense is not None:
            out.classifier.dense.load_state_dict(dense.state_dict())
        if model.classifier is not None and model.cfg.num_labels == model_cfg.num_labels:
            out.classifier.out.load_state_dict(model.classifier.out.state_dict())
    return out


def encoder_saver(cfg: TrainConfig, model_cfg: EncoderConfig, heads: tuple[str, ...], vocab: EncoderVocab, after=None):
    """``on_save``: the trained module (or, from several ranks, its state dict) written in HF layout to
    ``out_dir/model``; then ``after(module)``."""
    out = Path(cfg.out_dir)

    def save(trained):
        if isinstance(trained, dict):
            module = EncoderModel(model_cfg, heads)
            module.load_state_dict(trained)
        else:
            module = trained
        EncoderLM(module, vocab.tokenizer, str(out / "model"), {}, vocab.special).save(out / "model")
        if after is not None:
            after(module)
    return save


def check_fits(model: EncoderModel, seq_len: int) -> None:
    if seq_len > model.cfg.max_tokens:
        raise SlmError(f"data.seq_len {seq_len} is longer than the encoder takes ({model.cfg.max_tokens} tokens; "
                       f"raise model.config.max_position_embeddings)")


def labelled_examples(files: list[str], cfg: TrainConfig, vocab: EncoderVocab, max_length: int) -> list[tuple[list[int], int]]:
    rows = [r for f in files for r in read_labelled(f, cfg.data.text_column, cfg.data.label_column)]
    labels = [label_index(raw, cfg.model.num_labels, cfg.model.labels or [], where) for _, raw, where in rows]
    return list(zip(encode_texts(vocab.tokenizer, [text for text, _, _ in rows], max_length), labels))


def classification_sources(cfg: TrainConfig, vocab: EncoderVocab,
                           max_length: int) -> tuple[ClassifyBatches, ClassifyBatches, int]:
    """(train batches, validation batches, validation size) from ``data.train_file`` (one file or a list) and
    ``data.val_file``, or, without one, a seeded ``data.val_fraction`` held out of the training examples."""
    files = [cfg.data.train_file] if isinstance(cfg.data.train_file, str) else list(cfg.data.train_file or [])
    if not files:
        raise SlmError(f"config: task {cfg.task} needs data.train_file (a labelled .tsv/.csv/.jsonl/.json file "
                       f"or a list of them)")
    train = labelled_examples([data_path(f) for f in files], cfg, vocab, max_length)
    if cfg.data.val_file:
        val = labelled_examples([data_path(cfg.data.val_file)], cfg, vocab, max_length)
    else:  # hold out a seeded fraction of the training examples
        held = val_mask(len(train), cfg.data.val_fraction, cfg.run.seed)
        train, val = [e for e, h in zip(train, held) if not h], [e for e, h in zip(train, held) if h]
    return (ClassifyBatches(train, cfg.run.seed, vocab.pad_id),
            ClassifyBatches(val, cfg.run.seed, vocab.pad_id, shuffle=False), len(val))


def encoder_to_train(cfg: TrainConfig, d: Dist, heads: tuple[str, ...]) -> tuple[EncoderModel, EncoderVocab]:
    """The encoder a task trains, with exactly ``heads``, and its vocabulary: from scratch (``model.init:
    scratch``) or from the checkpoint ``model.init``."""
    if cfg.model.init == "scratch":
        vocab = encoder_vocab(encoder_tokenizer(cfg, d))
        return scratch_encoder(cfg, vocab, heads), vocab
    lm = load_encoder_to_train(cfg)
    return with_heads(lm.model, heads, cfg), encoder_vocab(Path(lm.source))


def check_encoder_run(cfg: TrainConfig) -> None:
    """The run settings encoder tasks do not take."""
    if cfg.lora is not None:
        raise SlmError("config: LoRA applies to decoder models; encoder tasks train every weight (drop the lora "
                       "section)")
    if cfg.run.activation_checkpointing:
        raise SlmError("config: run.activation_checkpointing is not available for encoder tasks")
