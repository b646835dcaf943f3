"""Bad input gets one line naming the problem, exit code 2, and no traceback."""

import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def run_slm(*args: str, stdin: str | None = None):
    proc = subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_error(rc: int, err: str, *needles: str):
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {err}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def write_tiny_gguf(path, arch="llama", tensor_type=None):
    """A minimal GGUF written with gguf-py: one embedding tensor, optionally of a raw quant type."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_feed_forward_length(64)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((10, 32), dtype=np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[tensor_type]
        w.add_tensor("token_embd.weight", np.zeros((10, 256 // block * size), dtype=np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_file(tmp_path):
    rc, _, err = run_slm("info", str(tmp_path / "nope.gguf"))
    assert_clean_error(rc, err, "nope.gguf", "no such file")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model file at all" * 4)
    rc, _, err = run_slm("info", str(bad))
    assert_clean_error(rc, err, "not a GGUF file")


def test_truncated_gguf(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[: 20_000_000])
    rc, _, err = run_slm("info", str(cut))
    assert_clean_error(rc, err, "truncated")


def test_corrupt_header(tmp_path, smollm2_gguf):
    data = bytearray(smollm2_gguf.read_bytes()[:4_000_000])
    data[4:8] = (7).to_bytes(4, "little")  # GGUF version 7
    bad = tmp_path / "version.gguf"
    bad.write_bytes(bytes(data))
    rc, _, err = run_slm("info", str(bad))
    assert_clean_error(rc, err, "version 7")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_tiny_gguf(path, arch="mamba")
    rc, _, err = run_slm("info", str(path))
    assert_clean_error(rc, err, "architecture", "mamba")


def test_unknown_hf_architecture(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mamba", "vocab_size": 10}')
    rc, _, err = run_slm("info", str(folder))
    assert_clean_error(rc, err, "mamba", "not supported")


def test_unsupported_quantization_type(tmp_path):
    path = tmp_path / "iq2.gguf"
    write_tiny_gguf(path, tensor_type=gguf.GGMLQuantizationType.IQ2_XXS)
    rc, _, err = run_slm("info", str(path))
    assert_clean_error(rc, err, "IQ2_XXS", "quantization type")


def test_prompt_longer_than_context(smollm2_gguf):
    rc, _, err = run_slm("generate", "-m", str(smollm2_gguf), "word " * 9000)
    assert_clean_error(rc, err, "context of 8192")


def test_unknown_registry_name():
    rc, _, err = run_slm("generate", "-m", "no-such-model", "hi")
    assert_clean_error(rc, err, "no-such-model", "registry")


def test_bad_sampling_value(smollm2_gguf):
    rc, _, err = run_slm("generate", "-m", str(smollm2_gguf), "hi", "--top-p", "0")
    assert_clean_error(rc, err, "top_p")


def test_chat_turn_over_the_context_keeps_the_session(smollm2_gguf):
    lines = "What is the capital of France?\n" + "word " * 9000 + "\nWhat is the capital of France?\n/exit\n"
    rc, out, err = run_slm("chat", "-m", str(smollm2_gguf), "--max-new-tokens", "12", "--quant", "none",
                       stdin=lines)
    assert rc == 0, err
    assert "context of 8192" in err and "Traceback" not in err
    assert out.count("Paris") == 2  # answered before and after the oversized turn
