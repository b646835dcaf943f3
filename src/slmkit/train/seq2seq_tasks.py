"""Parts of the T5 training tasks (``train/tasks/span_corruption.py``: span-corruption pretraining, and
``train/tasks/seq2seq.py``: seq2seq fine-tuning): noise masks, batches, the loss, tokenizer, init and saver.

Span corruption (Raffel et al. 2020, section 3.1.4): drop about 15% of a packed window's tokens in spans of
mean length 3; the encoder reads the window with each dropped span replaced by one sentinel ``<extra_id_i>``
(i = 0, 1, ... left to right), and the decoder writes each sentinel followed by the tokens it hid, then EOS.
The noise masks follow ``random_spans_noise_mask`` of t5/data/preprocessors.py, the window length that
corrupts to exactly ``inputs_length`` tokens ``compute_input_and_target_lengths`` of transformers'
examples/flax/language-modeling/run_t5_mlm_flax.py.

Every batch is a function of its global sample indices and the seed alone (a sample's noise mask comes from a
numpy Generator seeded with ``(seed, k)``), so resumed runs see the same data. Both tasks train a
``slmkit.models.t5.T5`` through ``Seq2SeqLoss`` and save an HF folder ``T5ForConditionalGeneration`` opens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlmError
from ..models.t5 import T5, T5Config
from ..api.seq2seq import Seq2SeqLM, load_seq2seq
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .distributed import Dist
from .epochs import EpochOrder
from .common import json_records, on_main_then_all, scratch_vocab_size

IGNORE = -100
NUM_SENTINELS = 100
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", *SENTINELS)  # pad 0, eos 1, unk 2, as in T5's vocabulary


# ------------------------------------------------------------------------------------- noise masks
def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a ``length``-token sequence, with T5's guards against degeneracy:
    at least one noise and one non-noise token, at least one span."""
    if not 0.0 < noise_density < 1.0:
        raise SlmError(f"noise density must be between 0 and 1 (exclusive), got {noise_density}")
    if not mean_noise_span_length >= 1.0:
        raise SlmError(f"mean noise span length must be at least 1, got {mean_noise_span_length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` items into ``num_segments`` non-empty runs."""
    starts = np.zeros(num_items, dtype=bool)  # item 0 always starts the first run
    starts[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(starts), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """A ``[length]`` bool mask, True on noise, as T5's ``random_spans_noise_mask``: ``round(length *
    density)`` noise tokens in ``round(noise / mean span)`` spans; noise and non-noise lengths are random
    segmentations of their totals, interleaved starting with non-noise (so the mask also ends with noise)."""
    if length < 2:
        raise SlmError(f"a noise mask needs at least 2 tokens, got {length}")
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    if length - num_noise < num_spans:
        raise SlmError(f"noise density {noise_density} leaves {length - num_noise} non-noise tokens, fewer than "
                       f"the {num_spans} spans between which they must lie; lower the density")
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    clean_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    starts = np.zeros(length, dtype=np.int64)
    starts[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(starts) % 2 == 1


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(encoder input, target) lengths after corrupting ``length`` tokens, EOS included in both: input =
    non-noise tokens + one sentinel per span + EOS, target = noise tokens + one sentinel per span + EOS."""
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(inputs_length: int, noise_density: float,
                                     mean_noise_span_length: float) -> tuple[int, int]:
    """(raw window length, target length): the longest window that corrupts to exactly ``inputs_length``
    encoder tokens, and the target it gives (512, 0.15, 3 -> 568, 114). Adding a raw token adds 0 or 1
    input tokens, so the count is always hit exactly."""
    if not isinstance(inputs_length, int) or inputs_length < 3:
        raise SlmError(f"span corruption: the input length (data.seq_len) must be an integer >= 3, "
                       f"got {inputs_length!r}")
    raw = 2
    if corrupted_lengths(raw, noise_density, mean_noise_span_length)[0] > inputs_length:
        raise SlmError(f"span corruption: no window corrupts to {inputs_length} input tokens")
    while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        raw += 1
    got, target = corrupted_lengths(raw, noise_density, mean_noise_span_length)
    if got != inputs_length:
        raise SlmError(f"span corruption: no window corrupts to exactly {inputs_length} input tokens "
                       f"(the closest gives {got}); choose another data.seq_len")
    return raw, target


# -------------------------------------------------------------------------------------- sentinels
def sentinel_ids(tokenizer: Tokenizer, count: int = NUM_SENTINELS) -> np.ndarray:
    """Ids of ``<extra_id_0>`` .. ``<extra_id_{count-1}>``, looked up by their text."""
    ids = [tokenizer.token_to_id(text) for text in SENTINELS[:count]]
    missing = [SENTINELS[i] for i, v in enumerate(ids) if v is None]
    if missing:
        raise SlmError(f"the tokenizer lacks the sentinel tokens span corruption needs ({len(missing)} missing, "
                       f"e.g. {missing[0]}); use a T5 tokenizer or train one here (model.init: scratch)")
    return np.array(ids, dtype=np.int64)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray, eos_id: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, target) for ``tokens`` under ``noise_mask``: each run of noise becomes the next
    sentinel in the input; the target holds each sentinel followed by the run it replaced; both end with EOS."""
    tokens, noise = np.asarray(tokens, dtype=np.int64), np.asarray(noise_mask, dtype=bool)
    previous = np.concatenate([[False], noise[:-1]])
    first = noise & ~previous
    spans = int(first.sum())
    if spans > len(sentinels):
        raise SlmError(f"span corruption: {spans} noise spans, but only {len(sentinels)} sentinel tokens; "
                       f"use a shorter data.seq_len or longer spans")
    inputs = np.where(first, sentinels[np.cumsum(first) - 1], tokens)[~(noise & previous)]
    noise_at = np.flatnonzero(noise)
    targets = np.insert(tokens[noise_at], np.flatnonzero(first[noise_at]), sentinels[:spans])
    return np.append(inputs, eos_id), np.append(targets, eos_id)


class SpanCorruptionBatches:
    """Span-corrupted packed windows: ``input_ids`` [B, inputs_length], ``attention_mask`` (all ones),
    ``labels`` [B, target_length]. Sample ``k`` is window ``k`` of the shuffled epoch order (or, without
    ``shuffle``, window ``k`` itself), cut to the raw length, with the noise mask of Generator ``(seed, k)``.

    ``dataset`` is a ``PackedDataset`` whose ``seq_len`` is the raw length (its windows hold one token more,
    which is dropped, so consecutive windows do not overlap)."""

    def __init__(self, dataset, seed: int, sentinels: np.ndarray, eos_id: int, inputs_length: int,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, shuffle: bool = True):
        self.raw_length, self.target_length = compute_input_and_target_lengths(
            inputs_length, noise_density, mean_noise_span_length)
        if dataset.seq_len != self.raw_length:
            raise SlmError(f"span corruption: the dataset serves {dataset.seq_len}-token windows, "
                           f"{self.raw_length} are needed for {inputs_length} input tokens")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.sentinels, self.eos_id, self.inputs_length = sentinels, eos_id, inputs_length
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        corrupted_spans = _span_counts(self.raw_length, noise_density, mean_noise_span_length)[1]
        if corrupted_spans > len(sentinels):
            raise SlmError(f"span corruption: {corrupted_spans} noise spans per window, but only "
                           f"{len(sentinels)} sentinel tokens; use a shorter data.seq_len")

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw window, encoder input, target) of sample ``k``."""
        window = self.dataset.sample(k, self.seed) if self.shuffle else self.dataset.window(k)
        window = window[:self.raw_length]
        mask = random_spans_noise_mask(self.raw_length, self.noise_density, self.mean_noise_span_length,
                                       np.random.default_rng((self.seed, int(k))))
        return (window, *corrupt(window, mask, self.sentinels, self.eos_id))

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        pairs = [self.example(k)[1:] for k in indices]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels,
                "tokens": torch.tensor(inputs.numel())}


# ------------------------------------------------------------------------------------------ the loss
class Seq2SeqLoss(nn.Module):
    """Teacher-forced cross-entropy of a T5: decoder inputs are ``shift_right(labels)``; returns the sum over
    label positions that are not -100 and their count (transformers' loss is the ratio)."""

    def __init__(self, model: T5):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids, attention_mask, decoder_input_ids=self.model.shift_right(labels))
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, (labels != IGNORE).sum()


# ------------------------------------------------------------------------------- seq2seq fine-tuning
def _where(path: Path, index: int, line: int | None) -> str:
    return f"{path}[{index}]" if line is None else f"{path}:{line}"


def _field(record, name: str, where: str) -> str:
    if not isinstance(record, dict):
        raise SlmError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise SlmError(f"{where}: no field {name!r} (fields: {', '.join(map(str, record)) or 'none'}; "
                       f"set data.input_field / data.target_field)")
    value = record[name]
    if not isinstance(value, str):
        raise SlmError(f"{where}: field {name!r} is {type(value).__name__}, not a string")
    return value


def load_pairs(path: str | Path, tokenizer: Tokenizer, input_field: str = "input", target_field: str = "target",
               max_input: int = 512, max_target: int = 128) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Tokenized (input, target) pairs of a file, each followed by EOS, as T5's tokenizer does; longer ones
    are cut to ``max_input`` / ``max_target`` tokens (EOS kept last). Returns the pairs and how many were cut."""
    if tokenizer.eos_id is None:
        raise SlmError("the tokenizer has no EOS token to end inputs and targets with")
    if max_input < 2 or max_target < 2:
        raise SlmError(f"the input and target length limits must be >= 2, got {max_input} and {max_target}")
    path = Path(path)
    texts = [(_field(r, input_field, _where(path, i, line)), _field(r, target_field, _where(path, i, line)))
             for i, line, r in json_records(path, "input/target records")]
    if not texts:
        raise SlmError(f"{path}: no records")
    sources = tokenizer.encode_batch([source for source, _ in texts], add_special_tokens=False)
    targets = tokenizer.encode_batch([target for _, target in texts], add_special_tokens=False)
    eos, cut, pairs = tokenizer.eos_id, 0, []
    for source, target in zip(sources, targets):
        cut += len(source) >= max_input or len(target) >= max_target
        pairs.append((source[:max_input - 1] + [eos], target[:max_target - 1] + [eos]))
    return pairs, cut


class Seq2SeqExamples:
    """Tokenized pairs visited in a fresh permutation each epoch (sample ``k`` is in epoch ``k // len``)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]):
        if not pairs:
            raise SlmError("a seq2seq split has no examples")
        self.pairs = pairs
        self.order = EpochOrder(len(pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, k: int, seed: int) -> tuple[list[int], list[int]]:
        return self.pairs[self.order(k, seed)]


class Seq2SeqBatches:
    """Right-padded batches: inputs with ``pad_id`` (and an attention mask), labels with -100."""

    def __init__(self, examples: Seq2SeqExamples, seed: int, pad_id: int, shuffle: bool = True):
        self.examples, self.seed, self.pad_id, self.shuffle = examples, seed, pad_id, shuffle

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        pairs = [self.examples.sample(k, self.seed) if self.shuffle else self.examples.pairs[k] for k in indices]
        width_in, width_out = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
        ids = torch.full((len(pairs), width_in), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width_in), dtype=torch.long)
        labels = torch.full((len(pairs), width_out), IGNORE, dtype=torch.long)
        for row, (source, target) in enumerate(pairs):
            ids[row, :len(source)], mask[row, :len(source)] = torch.tensor(source), 1
            labels[row, :len(target)] = torch.tensor(target)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": mask.sum()}


# ------------------------------------------------------------------------------------ scratch model
def t5_tokenizer(cfg: TrainConfig, d: Dist) -> Tokenizer:
    """The run's tokenizer: ``model.tokenizer`` when given, else a byte-level BPE trained on the corpus with
    T5's special tokens (<pad> 0, </s> 1, <unk> 2, <extra_id_0..99>) whose encode appends </s> as T5's does."""
    if cfg.model.tokenizer:
        folder = Path(cfg.model.tokenizer)
        if not folder.is_dir():
            raise SlmError(f"model.tokenizer: {folder} is not a folder")
        return Tokenizer.from_hf_dir(folder)
    folder = Path(cfg.out_dir) / "tokenizer"

    def make() -> None:
        from tokenizers import processors

        from .bpe import train_bpe

        draft = folder.with_name(".tokenizer.draft")
        train_bpe(cfg.data.corpus, draft, vocab_size=cfg.model.tokenizer_vocab_size, text_field=cfg.data.text_field,
                  special_tokens=T5_SPECIAL_TOKENS, chat_template=None)
        backend = Tokenizer.from_hf_dir(draft).backend
        eos = backend.token_to_id("</s>")
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])])
        Tokenizer(backend, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}).save(folder)
        shutil.rmtree(draft, ignore_errors=True)

    on_main_then_all(d, make, lambda: (folder / "tokenizer.json").is_file())
    return Tokenizer.from_hf_dir(folder)


def t5_init_weights(model: T5) -> None:
    """T5's initialisation (Mesh TensorFlow's, as transformers' ``T5PreTrainedModel._init_weights``): norms 1;
    embedding N(0, 1); q N(0, (d_model d_kv)^-1/2) (attention has no 1/sqrt(d_kv), the init carries it);
    k, v N(0, d_model^-1/2); o N(0, (heads d_kv)^-1/2); FFN in N(0, d_model^-1/2), out N(0, d_ff^-1/2);
    relative-position tables N(0, d_model^-1/2). One deviation: an untied ``lm_head`` is drawn with
    std d_model^-1/2 (transformers uses 1), so the first logits have unit scale and the loss starts near
    ln(vocab), as the tied v1.0 head, scaled by d_model^-1/2, does."""
    cfg = model.cfg
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    std = {"embed": 1.0, "lm_head": d ** -0.5, "rel_bias": d ** -0.5, "q": (d * cfg.d_kv) ** -0.5,
           "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5, "gate": d ** -0.5, "up": d ** -0.5,
           "down": cfg.d_ff ** -0.5}
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = name.split(".")[-2]
            if role.endswith("norm"):
                p.fill_(1.0)
            elif role in std:
                p.normal_(0.0, std[role])
            else:
                raise AssertionError(f"t5_init_weights: no rule for parameter {name}")


def scratch_t5(cfg: TrainConfig, tokenizer: Tokenizer) -> T5:
    if tokenizer.pad_id is None or tokenizer.eos_id is None:
        raise SlmError("a T5 tokenizer needs a pad and an EOS token (pad_token / eos_token in tokenizer_config.json)")
    fields = dict(cfg.model.config)
    vocab = scratch_vocab_size(fields, tokenizer.vocab_size)
    ids = {"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
           "decoder_start_token_id": tokenizer.pad_id}  # T5 starts decoding from pad
    try:
        t5_cfg = T5Config(vocab_size=vocab, **{**ids, **fields})
    except TypeError as exc:
        raise SlmError(f"model.config: {exc}") from None
    torch.manual_seed(cfg.run.seed)
    model = T5(t5_cfg)
    t5_init_weights(model)
    return model.train()


def load_t5(cfg: TrainConfig) -> tuple[T5, Tokenizer]:
    lm = load_seq2seq(Path(cfg.model.init).expanduser())
    if lm.tokenizer is None:
        raise SlmError(f"{cfg.model.init}: the model folder has no tokenizer (tokenizer.json); training needs one")
    return lm.model.train(), lm.tokenizer


def t5_saver(cfg: TrainConfig, model_cfg: T5Config, tokenizer: Tokenizer):
    def save(trained) -> None:
        if isinstance(trained, dict):  # gathered from the ranks of a distributed run
            with torch.device("meta"):
                model = T5(model_cfg)
            model.load_state_dict(trained, assign=True)
            trained = model
        Seq2SeqLM(trained, tokenizer, str(cfg.out_dir), {}).save(Path(cfg.out_dir) / "model")
    return save


def check_t5_run(cfg) -> None:
    """The run settings T5 tasks do not take."""
    if cfg.lora is not None:
        raise SlmError("config: LoRA is not supported for T5 tasks; remove the lora section")
    if cfg.run.activation_checkpointing:
        raise SlmError("config: run.activation_checkpointing is not supported for T5 models; set it to false")


def t5_model(cfg, d: Dist) -> tuple[T5, Tokenizer]:
    """The T5 to train and its tokenizer: from scratch (span corruption only) or the folder ``model.init``."""
    if cfg.model.init == "scratch":
        if cfg.task != "span_corruption":
            raise SlmError("config: task seq2seq fine-tunes a trained T5; set model.init to its folder")
        tokenizer = t5_tokenizer(cfg, d)
        return scratch_t5(cfg, tokenizer), tokenizer
    return load_t5(cfg)


def t5_blocks(model: T5) -> list[nn.Module]:
    return [*model.encoder["layers"], *model.decoder["layers"]]
