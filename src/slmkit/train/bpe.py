"""Train a byte-level BPE tokenizer on a corpus and save it as a Hugging Face tokenizer folder.

The tokenizer is GPT-2 style: the ByteLevel pre-tokenizer (GPT-2's split regex, no prefix space)
maps every byte to a printable character, the 256 byte characters are all in the vocabulary, so
any text encodes and decodes back exactly. Special tokens take the first ids; the first one is
the BOS, EOS and pad token. The folder holds tokenizer.json and tokenizer_config.json (with a
ChatML chat template), which both ``slmkit.tokenizer.Tokenizer.from_hf_dir`` and
``transformers.AutoTokenizer.from_pretrained`` read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from ..errors import SlmError
from ..tokenizer import Tokenizer
from .corpus import Paths, PathLike, read_documents

CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe(paths: Paths, out_dir: PathLike, *, vocab_size: int = 8192, text_field: str = "text",
              special_tokens: Sequence[str] = SPECIAL_TOKENS, min_frequency: int = 2,
              chat_template: str | None = CHATML, progress: bool = False) -> Path:
    """Train on every document of ``paths`` (see ``read_documents``); write the folder; return its path.

    ``vocab_size`` counts the special tokens and the 256 byte tokens. A corpus too small to supply
    enough merges of ``min_frequency`` gives a smaller vocabulary, with a warning.
    """
    specials = list(dict.fromkeys(special_tokens))
    if not specials:
        raise SlmError("train_bpe needs at least one special token (the first is BOS/EOS/pad)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(specials) + len(alphabet)
    if vocab_size < floor:
        raise SlmError(f"vocab_size {vocab_size} is too small: the {len(specials)} special tokens and "
                       f"{len(alphabet)} byte tokens alone need {floor}")
    if min_frequency < 1:
        raise SlmError(f"min_frequency must be at least 1, got {min_frequency}")

    backend = tokenizers.Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                         initial_alphabet=alphabet, show_progress=progress)
    backend.train_from_iterator(read_documents(paths, text_field), trainer=trainer)

    got = backend.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        warnings.warn(f"the corpus supports only {got} tokens with min_frequency={min_frequency}, "
                      f"fewer than the {vocab_size} asked for", stacklevel=2)
    first = specials[0]
    tokenizer = Tokenizer(backend, {"bos_token": first, "eos_token": first, "pad_token": first},
                          chat_template=chat_template)
    folder = Path(out_dir)
    tokenizer.save(folder)
    return folder
