"""UL2's denoisers for a decoder-only model (the UL2R objective): span statistics, the prefix split, examples,
and the prefix-LM mask and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.models.decoder import Decoder
from slmkit.train.denoisers import (UL2, UPALM, Denoiser, MixtureBatches, make_example, mixture, prefix_lm_mask,
                                    prefix_split)
from slmkit.train.objectives import PrefixLMLoss
from slmkit.train.seq2seq_tasks import random_spans_noise_mask

SENTINELS = np.arange(1000, 1064)


def runs(mask: np.ndarray) -> list[int]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(edges[1::2] - edges[0::2])


@pytest.mark.parametrize("denoiser", [d for d in UL2 if d.kind != "S"] + [UPALM[2]], ids=lambda d: d.name)
def test_span_corruption_statistics_match_the_denoiser(denoiser):
    """T5's counts: round(L * rate) noise tokens in round(noise / mean span) spans, in every window; the mean span
    length is then the denoiser's (up to that rounding: within 5 % on 2,048-token windows)."""
    rng = np.random.default_rng(0)
    length = 2048
    noise_count = round(length * denoiser.rate)
    span_count = max(round(noise_count / denoiser.mean_span), 1)
    lengths = []
    for _ in range(200):
        mask = random_spans_noise_mask(length, denoiser.rate, denoiser.mean_span, rng)
        spans = runs(mask)
        assert mask.sum() == noise_count and len(spans) == span_count
        lengths += spans
    assert abs(np.mean(lengths) - denoiser.mean_span) / denoiser.mean_span < 0.05
    assert np.std(lengths) > 0  # random segmentation, not fixed-length spans


def test_prefix_split_leaves_a_quarter_on_average():
    rng = np.random.default_rng(1)
    splits = np.array([prefix_split(256, 0.25, rng) for _ in range(4000)])
    assert splits.min() >= 128 and splits.max() <= 255
    assert abs((256 - splits).mean() / 256 - 0.25) < 0.01


def test_examples_hide_spans_behind_sentinels_and_restore_them():
    rng = np.random.default_rng(2)
    tokens = np.arange(10, 10 + 257)
    seq, prefix = make_example(tokens, Denoiser("R", 3, 0.15, 1.0), rng, SENTINELS, mode_id=5, eos_id=1)
    assert seq[0] == 5 and seq[-1] == 1
    inputs, targets = seq[1:prefix], seq[prefix:-1]
    used = [t for t in inputs if t >= 1000]
    assert used == list(SENTINELS[:len(used)]) and len(used) == round(round(257 * 0.15) / 3)
    # putting each target span back at its sentinel gives the window again
    restored, spans, current = [], {}, None
    for t in targets:
        if t >= 1000:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    for t in inputs:
        restored += spans[t] if t >= 1000 else [t]
    assert restored == list(tokens)
    seq, prefix = make_example(tokens, Denoiser("S", 0, 0.25, 1.0), rng, SENTINELS, mode_id=7, eos_id=1)
    assert seq[0] == 7 and list(seq[1:]) == list(tokens) and 128 < prefix <= 257


def test_prefix_lm_mask_is_bidirectional_over_the_prefix_only():
    mask = prefix_lm_mask(torch.tensor([3, 1]), 5)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(mask[0], expected)
    assert torch.equal(mask[1], torch.ones(5, 5, dtype=torch.bool).tril())  # prefix of one: plain causal


def test_prefix_lm_loss_sees_the_future_of_the_prefix_but_not_of_the_target():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    loss = PrefixLMLoss(model)
    ids = torch.randint(0, 64, (1, 12))
    labels = torch.full((1, 12), -100)
    labels[0, 5:] = torch.tensor(ids[0, 6:].tolist() + [3])
    prefix = torch.tensor([6])
    base, count = loss(ids, labels, prefix)
    assert count == 7
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 64  # inside the prefix: every target position sees it
    assert not torch.allclose(loss(changed, labels, prefix)[0], base)
    later = ids.clone()
    later[0, 11] = (later[0, 11] + 1) % 64  # the last input token: it predicts only the last label
    logits = model(ids, attn_mask=prefix_lm_mask(prefix, 12))
    logits_later = model(later, attn_mask=prefix_lm_mask(prefix, 12))
    assert torch.allclose(logits[0, :11], logits_later[0, :11], atol=1e-6)  # causal after the prefix


class _Windows:
    seq_len = 256

    def sample(self, k, seed):
        return np.random.default_rng([seed, k]).integers(10, 900, 257)


def test_mixture_batches_follow_the_weights_and_pad_to_one_width():
    batches = MixtureBatches(_Windows(), 0, UPALM, SENTINELS, {"[NLU]": 2, "[NLG]": 3, "[S2S]": 4}, eos_id=1,
                             pad_id=0)
    kinds = [batches.example(k)[2].kind for k in range(2000)]
    assert abs(kinds.count("S") / 2000 - 0.5) < 0.04 and abs(kinds.count("X") / 2000 - 0.25) < 0.04
    batch = batches.batch(list(range(8)))
    assert batch["input_ids"].shape == (8, batches.width - 1)
    for row in range(8):
        p = int(batch["prefix_len"][row])
        assert (batch["labels"][row, :p - 1] == -100).all() and batch["labels"][row, p - 1] != -100
        assert batch["input_ids"][row, 0] in (2, 3, 4)


def test_mixture_weights_are_checked():
    assert abs(sum(d.weight for d in mixture("ul2")) - 1) < 1e-9
    with pytest.raises(SlmError, match="4 non-negative weights"):
        mixture("upalm", [1, 2])
    with pytest.raises(SlmError, match="unknown mixture"):
        mixture("t5")
