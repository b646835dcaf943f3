"""slmkit's AVX2 int8 kernel against the arithmetic it claims to do, computed in float64 by torch."""

from __future__ import annotations

import pytest
import torch

from slmkit import kernels
from slmkit.nn.quant import Int8Linear, compact_path, quantize_int8

ops = kernels.load()
kernel = None if ops is None else ops.int8_linear
pytestmark = pytest.mark.skipif(ops is None, reason="the int8 kernel needs an x86 CPU with AVX2 and a C++ compiler")


@pytest.fixture(params=["avx2", "avx512", "torch"])
def matmul_path(request):
    """Each matmul test runs on the blocks path's 256-bit code, on the AVX-512 variant where the CPU has it,
    and on its torch form (nn.quant.round_to_int8_blocks), at every row count (no switch to the dense path)."""
    if request.param == "avx512" and not ops.cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512 VNNI")
    with compact_path(request.param):
        if request.param != "torch":
            assert ops.use_avx512() == (request.param == "avx512")
        yield request.param


def block_quantized_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per block of 32 (scale max|x|/127, round half to even), integer dot products
    with the int8 weights, block scales and row scales applied: what the kernel computes, in float64."""
    m, k = x.shape
    blocks = x.double().reshape(m, k // 32, 32)
    step = blocks.abs().amax(-1) / 127
    qx = torch.round(blocks / torch.where(step > 0, step, 1)[..., None]).clamp(-127, 127)
    per_block = torch.einsum("mbk,nbk->mnb", qx, q.double().reshape(q.shape[0], k // 32, 32))
    return (per_block * step[:, None, :]).sum(-1) * scale.double()


@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (1, 49, 64), (3, 1538, 576), (7, 960, 1536), (33, 203, 96)])
def test_int8_kernel_matches_its_arithmetic(m, n, k, matmul_path):
    torch.manual_seed(m * n + k)
    w, x = torch.randn(n, k), torch.randn(m, k) * 3
    x[0, :40] = 0  # an all-zero block (scale 0) and part of the next
    q, scale = quantize_int8(w)
    got = Int8Linear(q, scale, None)(x).double()
    want = block_quantized_reference(x, q, scale)
    assert got.shape == (m, n)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # and it is close to the exact product: the activation rounding costs well under 1% here
    dense = x.double() @ (q.double() * scale.double()[:, None]).T
    assert (got - dense).norm() / dense.norm() < 0.01


def test_int8_linear_uses_the_kernel_and_keeps_shapes_and_bias():
    torch.manual_seed(0)
    w, bias, x = torch.randn(40, 64), torch.randn(40), torch.randn(2, 5, 64)
    q, scale = quantize_int8(w)
    layer = Int8Linear(q, scale, bias)
    assert layer.kernel is kernel
    y = layer(x)
    want = block_quantized_reference(x.reshape(10, 64), q, scale).float().reshape(2, 5, 40) + bias
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-5)


def test_int8_kernel_rejects_bad_shapes():
    q, scale = quantize_int8(torch.randn(8, 48))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel(torch.randn(2, 48), q, scale)


def test_rms_norm_matches_torch():
    torch.manual_seed(1)
    x, w = torch.randn(3, 7, 576) * 4, torch.randn(576)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (576,), w, 1e-5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [1536, 13])  # 13: a tail past the 8-lane vectors
def test_silu_mul_matches_torch(width):
    torch.manual_seed(2)
    gate_up = torch.randn(2, 5, 2 * width) * 6
    gate_up[0, 0, :6] = torch.tensor([-100.0, -88.0, -87.0, 87.0, 89.0, 100.0])  # beyond exp's float range
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=2e-6)


def test_rms_norm_module_uses_torch_when_a_gradient_is_wanted():
    from slmkit.nn.norms import RMSNorm

    norm = RMSNorm(64, 1e-6)
    x = torch.randn(2, 64, requires_grad=True)
    norm(x).sum().backward()  # the kernel has no backward: this must take torch's op
    assert x.grad is not None and norm.weight.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (64,), norm.weight, 1e-6))


# head dims 64 and 128 sum the values in registers, 40 takes the generic loop
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("d", [64, 128, 40])
def test_attend_one_matches_sdpa_over_a_cache_view(masked, d):
    torch.manual_seed(3)
    b, h, kv, length, capacity = 3, 9, 3, 37, 50
    q = torch.randn(b, h, d) * 0.3  # scores spread over a range where exp's accuracy shows
    cache_k, cache_v = torch.randn(b, kv, capacity, d), torch.randn(b, kv, capacity, d)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # strided views, as the caches return them
    valid = torch.rand(b, length) > 0.3 if masked else None
    if masked:
        valid[:, -1] = True  # a row always sees its own new slot
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=None if valid is None else valid[:, None, None, :], scale=d ** -0.5,
        enable_gqa=True)
    got = ops.attend_one(q, k, v, valid, d ** -0.5)
    torch.testing.assert_close(got, want.reshape(b, h * d), atol=1e-5, rtol=1e-5)
    # a float16 cache (compact models): read as the float32 values it holds
    k16, v16 = cache_k.half()[:, :, :length], cache_v.half()[:, :, :length]
    want16 = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k16.float(), v16.float(), attn_mask=None if valid is None else valid[:, None, None, :],
        scale=d ** -0.5, enable_gqa=True)
    torch.testing.assert_close(ops.attend_one(q, k16, v16, valid, d ** -0.5), want16.reshape(b, h * d),
                               atol=1e-5, rtol=1e-5)


# K = 96 and 1120: an odd number of blocks (the AVX-512 variant takes two at a time), 1120 also past 16 of them
@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (5, 35, 64), (7, 33, 96), (4, 34, 1120), (32, 130, 1536)])
def test_int4_kernel_matches_its_arithmetic(m, n, k, matmul_path):
    from slmkit.nn.quant import Int4Linear, quantize_int4

    torch.manual_seed(m + n + k)
    w, x = torch.randn(n, k), torch.randn(m, k) * 2
    codes, scale, minimum = quantize_int4(w)
    layer = Int4Linear(codes, scale, minimum, None)
    assert layer.kernel is ops.int4_linear
    # what the kernel computes: float16 scale/minimum, x rounded to int8 blocks of 32
    s16, m16 = scale.half().double(), minimum.half().double()
    blocks = x.double().reshape(m, k // 32, 32)
    step = blocks.abs().amax(-1) / 127
    qx = torch.round(blocks / torch.where(step > 0, step, 1)[..., None]).clamp(-127, 127)
    code_dot = torch.einsum("mbk,nbk->mnb", qx, codes.double().reshape(n, k // 32, 32))
    want = (step[:, None] * (s16[None] * code_dot + m16[None] * qx.sum(-1)[:, None])).sum(-1)
    got = layer(x).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    dense = x.double() @ (codes.double().reshape(n, k // 32, 32) * s16[..., None] + m16[..., None]).reshape(n, k).T
    assert (got - dense).norm() / dense.norm() < 0.01


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("k", [576, 96])
def test_a_rows_output_does_not_depend_on_its_batch(kind, k, matmul_path):
    """Each row of a 7-row product (a group of four, then single rows) is bit-for-bit the row alone: the
    tokens of a speculative verify pass must agree exactly with one-token decoding steps. (The torch form
    is a BLAS matmul, whose blocking may change with the row count: the fused decode never runs on it.)"""
    from slmkit.nn.quant import Int4Linear, quantize_int4

    if matmul_path == "torch":
        pytest.skip("the torch form makes no promise across row counts")

    torch.manual_seed(k)
    w, x = torch.randn(70, k), torch.randn(7, k) * 2
    layer = Int4Linear(*quantize_int4(w), None) if kind == "int4" else Int8Linear(*quantize_int8(w), None)
    together = layer(x)
    for i in range(len(x)):
        assert torch.equal(together[i], layer(x[i:i + 1])[0]), f"row {i}"


@pytest.mark.parametrize("bias", [False, True])
def test_head_refinement_recomputes_the_top_entries_exactly(bias):
    torch.manual_seed(11)
    w, x = torch.randn(3000, 96), torch.randn(3, 96)
    q, scale = quantize_int8(w)
    head = Int8Linear(q, scale, torch.randn(3000) if bias else None)
    approximate = head(x)
    got = head.forward_refined(x, candidates=16)  # the kernel's refine_top
    exact = x.double() @ (q.double() * scale.double()[:, None]).T + (head.bias.double() if bias else 0)
    top = approximate.topk(16, dim=-1).indices
    changed = got != approximate
    assert changed.sum(-1).tolist() == [16, 16, 16]  # exactly the 16 best of each row were recomputed
    assert torch.equal(changed.nonzero()[:, 1].reshape(3, 16).sort(-1).values, top.sort(-1).values)
    torch.testing.assert_close(got.gather(1, top).double(), exact.gather(1, top), atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
