"""int8 / fp8 weight quantization: modules vs their references, the quality gate, the saved directory."""

import dataclasses

import pytest
import torch

from tests.conftest import MODEL_DIR
from worldserve.lab.evaluate import evaluate, heldout_episodes
from worldserve.model.config import PRESETS
from worldserve.model.io import ModelLoadError, load_model_dir
from worldserve.model.quality import gate_verdict, passes_gate
from worldserve.model.world_model import build
from worldserve.runtime.quantize import (
    Fp8Linear,
    Int8Linear,
    int8_linear_reference,
    load_quantized,
    quantization_of,
    quantize_int8,
    quantize_model,
    save_quantized,
    target_layers,
)


def small():
    return build(dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, window=4), seed=3)


def test_int8_per_channel_error_bound():
    w = torch.randn(48, 40) * torch.linspace(0.01, 10, 48)[:, None]  # channels of very different ranges
    q, s = quantize_int8(w)  # int8 [N, K], fp32 [N]
    assert q.dtype == torch.int8 and s.shape == (48,) and int(q.abs().max()) <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())  # at most half a step, per channel


@torch.no_grad()
def test_int8_linear_forward_is_reference_and_close_to_fp32():
    lin = torch.nn.Linear(64, 96)
    mod = Int8Linear.from_linear(lin)
    mod.w8a8 = False  # the weight-only reference path (the CPU W8A8 path: tests/unit/test_cpu_fast.py)
    x = torch.randn(3, 5, 64)
    assert torch.equal(mod(x), int8_linear_reference(x, mod.weight_q, mod.scale, mod.bias))
    ref = lin(x)
    assert float((mod(x) - ref).norm() / ref.norm()) < 0.01


@torch.no_grad()
def test_fp8_reference_close_and_refused_without_hopper():
    lin = torch.nn.Linear(64, 96)
    mod = Fp8Linear.from_linear(lin)
    assert mod.weight_f8.dtype == torch.float8_e4m3fn
    x = torch.randn(7, 64)
    ref = lin(x)
    assert float((mod(x) - ref).norm() / ref.norm()) < 0.05  # 3 mantissa bits
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
            quantize_model(small(), "fp8")


def test_quantize_model_keeps_interface_and_original():
    m = small()
    q = quantize_model(m, "int8")
    names = target_layers(m)
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "proj", "fc1", "fc2")]
    assert names == ["local", *blocks, "head"]
    assert all(isinstance(q.dynamics.get_submodule(n), Int8Linear) for n in names)
    assert all(isinstance(m.dynamics.get_submodule(n), torch.nn.Linear) for n in names)  # not modified
    assert quantization_of(q) == "int8" and quantization_of(m) == "fp32"
    cache = q.allocate_cache(3)
    slots = torch.tensor([2, 0])
    tokens = torch.randint(0, q.cfg.vocab_size, (2, 2, q.cfg.tokens_per_frame))
    q.prefill(cache, slots, tokens, torch.randint(0, 3, (2, 1)))
    logits, reward, done = q.step(cache, slots, torch.tensor([0, 2]))
    assert logits.shape == (2, q.cfg.tokens_per_frame, q.cfg.vocab_size) and reward.shape == done.shape == (2,)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(m, "int4")


def test_int8_within_gate_on_heldout_rollouts():
    # the serving gate: open-loop PSNR at step 8 on held-out episodes loses at most 0.5 dB vs fp32
    model = load_model_dir(MODEL_DIR)
    eps = heldout_episodes(6)
    ref = evaluate(model, eps)
    res = evaluate(quantize_model(model, "int8"), eps)
    assert passes_gate(ref.model_psnr, res.model_psnr), gate_verdict(ref.model_psnr, res.model_psnr, "variant")
    assert res.token_acc[8] >= ref.token_acc[8] - 0.05


def test_save_and_load_quantized(tmp_path):
    m = small()
    q = quantize_model(m, "int8")
    out = tmp_path / "q"
    save_quantized(q, out, "0" * 64, "# test")
    back = load_quantized(out)
    assert quantization_of(back) == "int8"
    for (k, a), (k2, b) in zip(q.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match="sha256"):
        load_quantized(out)
