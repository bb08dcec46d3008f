"""64-bit element offsets in the Triton kernels: row x stride past 2**31 (base's logits from 525 rows: 64 tokens x
64,000 entries) must not wrap. A tensor that large cannot be allocated here, so the offset arithmetic is run through
the interpreter on its own (int32 products wrap there as on a GPU) and the kernels are checked to use it."""

import inspect

import torch
import triton
import triton.language as tl

from worldserve.kernels import fsq, int8_matmul, sampling

BASE_ROW = 64 * 64000  # elements per row of base's logits [B, N, V]


@triton.jit
def _offsets_kernel(out_ptr, stride):
    b = tl.program_id(0) + 524  # rows 524, 525, 526: 525 * BASE_ROW > 2**31
    tl.store(out_ptr + tl.program_id(0), sampling._offset(b, stride))


@triton.jit
def _int32_kernel(out_ptr, stride):
    b = tl.program_id(0) + 524
    tl.store(out_ptr + tl.program_id(0), (b * stride).to(tl.int64))


def test_offset_is_64_bit_past_int32():
    out = torch.zeros(3, dtype=torch.int64)
    _offsets_kernel[(3,)](out, BASE_ROW)
    assert out.tolist() == [r * BASE_ROW for r in (524, 525, 526)]
    assert 525 * BASE_ROW > 2**31 - 1


def test_int32_product_would_wrap():
    """The check above can fail: the same product in 32 bits wraps past row 524."""
    out = torch.zeros(3, dtype=torch.int64)
    _int32_kernel[(3,)](out, BASE_ROW)
    assert out[0].item() == 524 * BASE_ROW and out[1].item() != 525 * BASE_ROW


def test_kernels_index_with_64_bit_offsets():
    assert "_offset(b, stride_b)" in inspect.getsource(sampling._sample_kernel.fn)
    src = inspect.getsource(int8_matmul._int8_matmul_kernel.fn)
    assert "tl.arange(0, BLOCK_M)).to(tl.int64)" in src and "tl.arange(0, BLOCK_N)).to(tl.int64)" in src
    assert "tl.arange(0, BLOCK_M)).to(tl.int64)" in inspect.getsource(fsq._fsq_kernel.fn)


def test_int8_custom_op_matches_reference():
    """torch.ops.worldserve.int8_matmul (what Int8Linear runs on CUDA, eager and compiled) is the kernel."""
    from worldserve.runtime.quantize import int8_linear_reference, quantize_int8

    g = torch.Generator().manual_seed(0)
    q, s = quantize_int8(torch.randn(48, 64, generator=g))
    x, b = torch.randn(10, 64, generator=g), torch.randn(48, generator=g)
    torch.testing.assert_close(torch.ops.worldserve.int8_matmul(x, q, s, b), int8_linear_reference(x, q, s, b),
                               atol=1e-4, rtol=1e-5)
