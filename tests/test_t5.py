"""T5 v1.0 (relu, tied, d_model^-0.5 head) and v1.1 / Flan (gated-gelu, untied) against transformers on
tiny random checkpoints: logits, greedy generation, cached vs recomputed decoding, save / reload, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from slmkit.errors import ModelFileError, SlmError, UnsupportedError  # noqa: E402
from slmkit.models.t5 import (T5Config, hf_to_t5_key, relative_position_bucket,  # noqa: E402
                              t5_to_hf_key)
from slmkit.api.seq2seq import load_seq2seq  # noqa: E402

VOCAB = 96
VARIANTS = {
    # v1.0: relu FFN, head tied to the embedding and scaled by d_model^-0.5, default buckets (32, 128)
    "v1.0": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="relu",
                 tie_word_embeddings=True),
    # v1.1 / Flan: gated-gelu FFN, own lm_head, heads*d_kv (48) != d_model, few buckets so long
    # distances hit the log-spaced and saturated buckets
    "v1.1": dict(d_model=32, d_kv=12, d_ff=40, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, relative_attention_num_buckets=16, relative_attention_max_distance=24),
    # as v1.1 with a deeper decoder (logits only: transformers 5.24's generate breaks on unequal depths)
    "v1.1-deep-decoder": dict(d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norms around 1, a strong relative-position bias, and layers that outweigh
    the embedding (otherwise a tied random model only repeats its input token)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(noise)
            elif name == "shared.weight":
                p.copy_(noise * 0.3)
            else:
                p.copy_(noise * 1.5 / p.shape[-1] ** 0.5)


def make_folder(folder: Path, variant: str, seed: int = 0, eos: int = 1) -> Path:
    """save_pretrained of a random T5. Untied variants get their own ``lm_head.weight`` and a config saying
    ``tie_word_embeddings: false``, the layout of google/flan-t5-* (transformers 5.24 cannot build an untied
    T5 from a config; it loads one untied from such a file)."""
    spec = dict(VARIANTS[variant])
    cfg = transformers.T5Config(vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=eos, **spec)
    hf = transformers.T5ForConditionalGeneration(cfg)
    randomize(hf, seed)
    hf.save_pretrained(folder)
    if not spec["tie_word_embeddings"]:
        state = load_file(folder / "model.safetensors")
        gen = torch.Generator().manual_seed(seed + 100)
        state["lm_head.weight"] = torch.randn(VOCAB, spec["d_model"], generator=gen) * 0.3
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config.pop("scale_decoder_outputs")
        config["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_from(folder: Path, **kw):
    return transformers.T5ForConditionalGeneration.from_pretrained(folder, **kw).eval()


def padded_batch(lengths=(9, 4, 30, 6), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, VOCAB, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return {v: make_folder(root / v, v) for v in VARIANTS}


def check_variant_is_real(hf, variant: str) -> None:
    """Guards the test itself: v1.0 really tied and scaled, v1.1 really untied and unscaled in transformers."""
    tied = hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()
    assert tied == VARIANTS[variant]["tie_word_embeddings"] == hf.config.scale_decoder_outputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(folders, variant):
    hf, lm = hf_from(folders[variant]), load_seq2seq(folders[variant])
    check_variant_is_real(hf, variant)
    assert lm.config.tie_word_embeddings == lm.config.scale_decoder_outputs == VARIANTS[variant]["tie_word_embeddings"]
    ids, mask = padded_batch()
    dec = torch.randint(0, VOCAB, (ids.shape[0], 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ref_enc = hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = lm.logits(ids, dec, mask)
    assert (ours - ref).abs().max().item() <= 1e-4
    enc = lm.model.encode(ids, mask)
    real = mask.bool()
    assert (enc[real] - ref_enc[real]).abs().max().item() <= 1e-4
    # ragged lists are right-padded the same way
    rows = [ids[i, :int(mask[i].sum())].tolist() for i in range(len(ids))]
    assert torch.equal(lm.logits(rows, dec), ours)


def set_eos(folder: Path, eos: int) -> None:
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data["eos_token_id"] = eos
        (folder / name).write_text(json.dumps(data))


def pick_eos(rows: list[list[int]]) -> int:
    """A token that ends one row part-way and never occurs in another, so both ways a row can end are
    compared (from a run with EOS switched off)."""
    for row in rows:
        for k in range(3, len(row) - 3):
            if row[k] not in row[:k] and any(row[k] not in other for other in rows):
                return row[k]
    raise AssertionError(f"no usable EOS candidate in {rows}")


@pytest.mark.parametrize("variant, seed", [("v1.0", 1), ("v1.1", 0)])
def test_greedy_generation_matches_transformers(tmp_path, variant, seed):
    max_new = 20
    ids, mask = padded_batch()
    folder = make_folder(tmp_path / variant, variant, seed=seed)
    free = load_seq2seq(folder)
    free.eos_ids = set()
    eos = pick_eos(free.generate_ids(ids, max_new_tokens=max_new, attention_mask=mask))
    set_eos(folder, eos)

    out = hf_from(folder).generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=max_new)
    hf_rows = [r[1:].tolist() for r in out]
    stopped = [eos in r for r in hf_rows]
    assert any(stopped) and not all(stopped) and out.shape[1] == max_new + 1  # both endings are exercised
    expected = [r[:r.index(eos)] if eos in r else r for r in hf_rows]  # ours stops at (and drops) EOS

    lm = load_seq2seq(folder)
    assert lm.eos_ids == {eos}
    got = lm.generate_ids(ids, max_new_tokens=max_new, attention_mask=mask)
    assert got == expected
    assert len({tuple(r) for r in got}) == len(got)  # rows differ: padding is honoured per row
    # the same from ragged lists (padding and mask built by generate_ids)
    rows = [ids[i, :int(mask[i].sum())].tolist() for i in range(len(ids))]
    assert lm.generate_ids(rows, max_new_tokens=max_new) == expected


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_cached_decoding_equals_full_recompute(folders, variant):
    lm = load_seq2seq(folders[variant])
    model = lm.model
    ids, mask = padded_batch()
    steps = 14
    tokens = torch.randint(0, VOCAB, (ids.shape[0], steps), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = model.cfg.decoder_start_token_id
    with torch.no_grad():
        enc = model.encode(ids, mask)
        full = model.decode(tokens, enc, mask)  # no cache: the whole prefix at once
        cache = model.new_cache(capacity=2)  # too small on purpose: the cache must grow
        for t in range(steps):
            step = model.decode(tokens[:, t:t + 1], enc, mask, cache, start=t)
            # float rounding only (matmuls of other shapes): 1.01e-5 was measured on an AVX2 machine; a cache
            # fault would be off by tenths
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 5e-5, f"step {t}"
        assert cache.length == steps and cache.keys[0].shape[2] >= steps
        # a chunk of several tokens, then single steps, equals the same recompute
        chunked = model.new_cache()
        first = model.decode(tokens[:, :5], enc, mask, chunked, start=0)
        rest = [model.decode(tokens[:, t:t + 1], enc, mask, chunked, start=t) for t in range(5, steps)]
        assert (torch.cat([first, *rest], dim=1) - full).abs().max().item() <= 5e-5
        # the cross-attention K/V were computed once and kept
        assert chunked.cross is not None and len(chunked.cross) == model.cfg.num_decoder_layers


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_save_then_transformers_reloads_same_logits(folders, tmp_path, variant):
    lm = load_seq2seq(folders[variant])
    out = lm.save(tmp_path / "saved")
    saved = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not VARIANTS[variant]["tie_word_embeddings"])
    hf = hf_from(out)
    check_variant_is_real(hf, variant)
    ids, mask = padded_batch()
    dec = torch.randint(0, VOCAB, (ids.shape[0], 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (lm.logits(ids, dec, mask) - ref).abs().max().item() <= 1e-4
    again = load_seq2seq(out)
    assert torch.equal(again.logits(ids, dec, mask), lm.logits(ids, dec, mask))
    assert json.loads((out / "generation_config.json").read_text())["decoder_start_token_id"] == 0
    lm.save(out)  # overwriting an existing folder works and leaves no temporary folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_key_mapping_round_trips_every_tensor(folders):
    for variant in ("v1.0", "v1.1"):
        names = load_file(folders[variant] / "model.safetensors").keys()
        cfg = T5Config.from_hf(json.loads((folders[variant] / "config.json").read_text()))
        for name in names:
            assert t5_to_hf_key(hf_to_t5_key(name), cfg) == name
    assert hf_to_t5_key("decoder.block.1.layer.1.EncDecAttention.q.weight") == "decoder.layers.1.cross.q.weight"
    assert hf_to_t5_key("encoder.block.1.layer.1.DenseReluDense.wi_0.weight") == "encoder.layers.1.ffn.gate.weight"
    assert hf_to_t5_key("encoder.block.1.layer.2.layer_norm.weight") is None  # encoder blocks have 2 sublayers


def test_shift_right_and_loss_match_transformers(folders):
    hf, lm = hf_from(folders["v1.1"]), load_seq2seq(folders["v1.1"])
    ids, mask = padded_batch()
    labels = torch.randint(2, VOCAB, (ids.shape[0], 8), generator=torch.Generator().manual_seed(5))
    labels[1, 5:] = -100
    labels[3, 2:] = -100
    assert torch.equal(lm.model.shift_right(labels), hf._shift_right(labels))
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    ours = lm.model.loss(ids, mask, labels)
    assert abs(ours.item() - ref.item()) <= 1e-5
    # gradients agree too, including the shared relative-position tables and the embedding
    ref.backward()
    with torch.enable_grad():
        lm.model.requires_grad_(True)
        lm.model.loss(ids, mask, labels).backward()
    pairs = [(lm.model.embed.weight, hf.shared.weight),
             (lm.model.encoder["rel_bias"].weight,
              hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight),
             (lm.model.decoder["rel_bias"].weight,
              hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight),
             (lm.model.decoder["layers"][1].cross.k.weight, hf.decoder.block[1].layer[1].EncDecAttention.k.weight)]
    for mine, theirs in pairs:
        assert theirs.grad.abs().max() > 0
        assert (mine.grad - theirs.grad).abs().max().item() <= 1e-4 * (1 + theirs.grad.abs().max().item())


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_relative_buckets_and_parameter_count_match_transformers(folders, variant):
    hf = hf_from(folders[variant])
    attn = hf.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        ref = attn._relative_position_bucket(rel, bidirectional, attn.relative_attention_num_buckets,
                                             attn.relative_attention_max_distance)
        ours = relative_position_bucket(rel, bidirectional, attn.relative_attention_num_buckets,
                                        attn.relative_attention_max_distance)
        assert torch.equal(ours, ref)
    lm = load_seq2seq(folders[variant])
    assert lm.num_parameters() == hf.num_parameters() == sum(p.numel() for p in lm.model.parameters())


def test_fp16_keeps_wo_in_fp32_like_transformers(folders):
    hf16, hf32 = hf_from(folders["v1.1"], dtype=torch.float16), hf_from(folders["v1.1"])
    lm = load_seq2seq(folders["v1.1"], dtype="float16")
    assert hf16.decoder.block[0].layer[2].DenseReluDense.wo.weight.dtype == torch.float32
    assert lm.model.decoder["layers"][0].ffn.down.weight.dtype == torch.float32
    assert lm.model.decoder["layers"][0].ffn.up.weight.dtype == torch.float16
    ids, mask = padded_batch()
    dec = torch.randint(0, VOCAB, (ids.shape[0], 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref16 = hf16(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
        ref32 = hf32(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    ours = lm.logits(ids, dec, mask)
    # fp16 rounding alone moves logits (|logit| up to ~6) by ~0.2 here; ours is as accurate as transformers'
    hf_error = (ref16 - ref32).abs().max().item()
    assert (ours - ref32).abs().max().item() <= 1.5 * hf_error + 0.01
    assert (ours - ref16).abs().max().item() <= 0.1


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer that appends </s> like T5's: <pad>=0, </s>=1, <unk>=2, w3..w95."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    for name in ("<pad>", "</s>", "<unk>"):
        tok.add_special_tokens([name])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "clean_up_tokenization_spaces": False}))


def test_text_generation_matches_transformers(tmp_path):
    folder = make_folder(tmp_path / "tok", "v1.1", seed=7)
    write_tokenizer(folder)
    texts = ["w5 w17 w3 w40", "w9", "w60 w61 w62 w63 w64 w65 w66 w67 w68 w69 w70 w71"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    out = hf_from(folder).generate(**batch, do_sample=False, num_beams=1, max_new_tokens=12)
    expected = hf_tok.batch_decode(out, skip_special_tokens=True)
    lm = load_seq2seq(folder)
    assert lm.tokenizer is not None
    assert lm.generate(texts, max_new_tokens=12) == expected
    assert lm.generate(texts[0], max_new_tokens=12) == expected[0]
    info = lm.info()
    assert info["family"] == "t5" and info["parameters"] == lm.num_parameters() and info["tokenizer"] != "none"
    saved = lm.save(tmp_path / "with_tok")
    assert transformers.AutoTokenizer.from_pretrained(saved)(texts[0]).input_ids == hf_tok(texts[0]).input_ids


def test_no_tokenizer_gives_token_id_api_only(folders):
    lm = load_seq2seq(folders["v1.0"])
    assert lm.tokenizer is None and lm.info()["tokenizer"] == "none"
    with pytest.raises(SlmError, match="no tokenizer"):
        lm.generate("hello")


def edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, words", [
    (dict(feed_forward_proj="gated-tanh"), "gated-tanh"),
    (dict(feed_forward_proj="relu-gated"), "relu-gated"),
    (dict(model_type="mt5"), "mt5"),
    (dict(architectures=["T5EncoderModel"]), "T5EncoderModel"),
    (dict(is_encoder_decoder=False), "is_encoder_decoder"),
])
def test_bad_config_is_unsupported(folders, tmp_path, changes, words):
    bad = edit_config(folders["v1.0"], tmp_path / "bad", **changes)
    with pytest.raises(UnsupportedError, match=words):
        load_seq2seq(bad)


def test_invalid_config_values_are_named(folders, tmp_path):
    bad = edit_config(folders["v1.0"], tmp_path / "zero", d_model=0)
    with pytest.raises(SlmError, match="d_model must be a positive integer"):
        load_seq2seq(bad)
    with pytest.raises(SlmError, match="relative_attention_max_distance"):
        T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=16)


def test_missing_unexpected_and_misshapen_tensors_are_model_file_errors(folders, tmp_path):
    import shutil

    def with_state(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(folders["v1.1"], folder)
        state = load_file(folder / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors")
        return folder

    gone = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    folder = with_state("missing", lambda s: s.pop(gone))
    with pytest.raises(ModelFileError, match=f"missing 1 tensor.*{gone}"):
        load_seq2seq(folder)
    folder = with_state("extra", lambda s: s.update({"encoder.block.0.layer.0.SelfAttention.bias": torch.zeros(3)}))
    with pytest.raises(ModelFileError, match="unexpected 1 tensor.*SelfAttention.bias"):
        load_seq2seq(folder)
    folder = with_state("extra_block", lambda s: s.update(
        {"encoder.block.2.layer.0.layer_norm.weight": torch.ones(32)}))  # a third encoder block
    with pytest.raises(ModelFileError, match="unexpected 1 tensor.*encoder.block.2"):
        load_seq2seq(folder)
    shape = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
    folder = with_state("shape", lambda s: s.update({shape: torch.zeros(7, 32)}))
    with pytest.raises(ModelFileError, match=f"{shape} has shape"):
        load_seq2seq(folder)


def test_bad_inputs_are_named_errors(folders):
    lm = load_seq2seq(folders["v1.0"])
    with pytest.raises(SlmError, match="token ids must be in"):
        lm.generate_ids([[3, VOCAB]], max_new_tokens=2)
    with pytest.raises(SlmError, match="max_new_tokens"):
        lm.generate_ids([[3, 4]], max_new_tokens=0)
    with pytest.raises(SlmError, match="empty"):
        lm.generate_ids([[3, 4], []], max_new_tokens=2)
    with pytest.raises(SlmError, match="decoder_input_ids"):
        lm.logits([[3, 4]], [[0, 1], [0, 2]])
    with pytest.raises(SlmError, match="unknown dtype"):
        load_seq2seq(folders["v1.0"], dtype="float8")


def test_slmkit_load_and_describe_dispatch_to_t5(folders):
    import slmkit
    from slmkit.api import describe
    from slmkit.api.seq2seq import Seq2SeqLM

    lm = slmkit.load(folders["v1.1"])
    assert isinstance(lm, Seq2SeqLM)
    ids, mask = padded_batch()
    assert torch.equal(lm.logits(ids, [[0, 4, 9]] * len(ids), mask),
                       load_seq2seq(folders["v1.1"]).logits(ids, [[0, 4, 9]] * len(ids), mask))
    info = describe(folders["v1.1"])
    assert info["family"] == "t5" and info["decoder_layers"] == 2 and not info["tied_embeddings"]
    with pytest.raises(SlmError, match="quant"):
        slmkit.load(folders["v1.1"], quant="int8")
