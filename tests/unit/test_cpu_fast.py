"""The CPU fast paths against their plain PyTorch references: int8 x int8 (FBGEMM, per-row activation scales)
vs weight-only Int8Linear, and the bf16 bmm attention vs F.scaled_dot_product_attention."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from worldserve.model.config import PRESETS
from worldserve.model.dynamics import attention
from worldserve.model.world_model import build
from worldserve.runtime import int8_cpu
from worldserve.runtime.quantize import Int8Linear, quantize_model

pytestmark = pytest.mark.skipif(not int8_cpu.available(), reason="FBGEMM not in this torch build")


@torch.no_grad()
def test_w8a8_close_to_weight_only_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80)
    mod = Int8Linear.from_linear(lin)
    assert mod.w8a8
    x = torch.randn(4, 7, 96) * torch.linspace(0.01, 10, 4)[:, None, None]  # rows of very different ranges
    got, ref = mod(x), mod.reference(x)  # [4, 7, 80]
    assert got.shape == ref.shape and got.dtype == x.dtype
    for i in range(4):  # relative to each row group's own size: per-row scales keep small rows accurate
        assert float((got[i] - ref[i]).norm() / ref[i].norm()) < 0.01
    xb = x.bfloat16()
    assert mod(xb).dtype == torch.bfloat16
    mod.bias = None
    torch.testing.assert_close(mod(x), mod.reference(x), atol=0.05 * float(x.abs().max()), rtol=0.02)


@torch.no_grad()
def test_w8a8_rows_do_not_depend_on_the_batch():
    # FBGEMM's own dynamic quantization takes one scale per call; ours is per row: a row's output is the
    # same alone or next to rows 1000x larger (a request's frames must not depend on what else is served)
    mod = Int8Linear.from_linear(torch.nn.Linear(64, 48))
    x = torch.randn(6, 64)
    batch = torch.cat([x, 1000 * torch.randn(5, 64)])
    assert torch.equal(mod(batch)[:6], mod(x))
    assert torch.equal(mod(batch)[2:3], mod(x[2:3]))


@torch.no_grad()
def test_w8a8_model_step_close_to_reference_and_weights_reloaded():
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, window=4)
    q = quantize_model(build(cfg, seed=2), "int8")
    cache_a, cache_b = q.allocate_cache(3), q.allocate_cache(3)
    slots = torch.arange(3)
    tokens = torch.randint(0, cfg.vocab_size, (3, 3, cfg.tokens_per_frame))
    acts = torch.randint(0, 3, (3, 2))
    q.prefill(cache_a, slots, tokens, acts)
    fast, _, _ = q.step(cache_a, slots, torch.tensor([0, 1, 2]))
    for m in q.modules():
        if isinstance(m, Int8Linear):
            m.w8a8 = False
    q.prefill(cache_b, slots, tokens, acts)
    ref, _, _ = q.step(cache_b, slots, torch.tensor([0, 1, 2]))
    assert float((fast - ref).norm() / ref.norm()) < 0.02
    assert bool((fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95)
    # the packed weight follows load_state_dict (load_quantized loads into a quantized skeleton)
    lin = q.dynamics.head
    lin.w8a8 = True
    x = torch.randn(2, 5, lin.in_features)
    before = lin(x)
    lin.load_state_dict({**lin.state_dict(), "weight_q": -lin.weight_q})
    assert not torch.equal(lin(x), before)


@torch.no_grad()
@pytest.mark.parametrize("mask_shape", [(3, 1, 1, 48), (48, 48)])
def test_bf16_cpu_attention_matches_sdpa(mask_shape):
    torch.manual_seed(1)
    nq = 48 if len(mask_shape) == 2 else 16
    q, k, v = torch.randn(3, 2, nq, 32), torch.randn(3, 2, 48, 32), torch.randn(3, 2, 48, 32)
    mask = torch.rand(mask_shape) > 0.4
    mask |= torch.eye(48, dtype=torch.bool) if len(mask_shape) == 2 else (torch.arange(48) == 0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention(q, k, v, mask), ref)  # fp32: the reference itself
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref, atol=0.03, rtol=0.03)


def test_rope_pairs_bit_equal_to_rope():
    from worldserve.model.dynamics import apply_rope, apply_rope_pairs, rope_tables

    cos, sin = rope_tables(torch.arange(12).view(3, 4, 1), 32, 10000.0)  # [3, 4, 1, 16]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, 2, 32).to(dtype)
        c, s = cos.to(dtype), sin.to(dtype)
        want = torch.stack((x[..., 0::2] * c - x[..., 1::2] * s, x[..., 0::2] * s + x[..., 1::2] * c), -1).flatten(-2)
        assert torch.equal(apply_rope_pairs(x, c, s), want)
        assert torch.equal(apply_rope(x, cos, sin), want)


@torch.no_grad()
def test_bf16_attention_rows_do_not_depend_on_the_batch_or_the_key_layout():
    """The cached step's attention (bf16 on the CPU): a row alone gives the same bits as in a batch of rows with other
    windows (short windows masked), and the window read strided (as KVCache's gather views it) gives the same bits as
    the same window contiguous; and it stays within bf16 rounding of the fp32 result."""
    torch.manual_seed(2)
    b, h, nq, s, hd = 6, 4, 16, 64, 32
    q = torch.randn(b, nq, h, hd).bfloat16().transpose(1, 2)  # strided, as qkv_heads returns it
    kv = torch.randn(2, b, s, h * hd).bfloat16()
    k, v = (t.view(b, s, h, hd).transpose(1, 2) for t in kv)  # [B, H, S, hd] strided views
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    mask[1, ..., 16:] = False
    mask[4, ..., 1:] = False
    mask[5, ..., 40:] = False
    batch = attention(q, k, v, mask)
    assert torch.equal(batch, attention(q.contiguous(), k.contiguous(), v.contiguous(), mask))
    for i in range(b):
        alone = attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], mask[i : i + 1])
        assert torch.equal(alone, batch[i : i + 1]), f"row {i} differs alone and in the batch"
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(batch.float(), ref, atol=0.01, rtol=0.01)
