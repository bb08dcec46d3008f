"""Every precision on every preset: bf16 on both tokenizers, the quality gate of tiny at bf16 / int8, and the
start-up refusal of combinations that cannot work."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import MODEL_DIR
from worldserve.lab.evaluate import CONTEXT, evaluate, heldout_episodes, open_loop
from worldserve.model.config import PRESETS
from worldserve.model.io import load_model_dir
from worldserve.model.quality import GATE_DB, gate_loss
from worldserve.model.world_model import build
from worldserve.runtime.quantize import quantize_model
from worldserve.runtime.support import Unsupported, check_supported, check_trt_precision
from worldserve.settings import ModelSettings


@pytest.fixture(scope="module")
def base_pair():
    fp32 = build(PRESETS["base"], seed=0)
    return fp32, build(PRESETS["base"], seed=0).to(torch.bfloat16)


@torch.no_grad()
def test_base_bf16_encode_step_decode_close_to_fp32(base_pair):
    # the FSQ tokenizer's convolutions run in bf16 (was: float input into bf16 convs -> RuntimeError)
    ref, m = base_pair
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, cfg.height, cfg.width, 3), dtype=torch.uint8, generator=g)
    tok, tok_ref = m.encode(frames), ref.encode(frames)  # int64 [4, N]
    assert tok.dtype == torch.int64 and tok.shape == tok_ref.shape
    assert float((tok == tok_ref).float().mean()) > 0.8  # FSQ rounds near-boundary values either way
    tokens = tok_ref.view(2, 2, -1)
    slots = torch.arange(2)
    caches = [mod.allocate_cache(2) for mod in (ref, m)]
    assert caches[1].k.dtype == torch.bfloat16
    acts, known = ref.unknown_actions(2, 1)
    for mod, cache in zip((ref, m), caches, strict=True):
        mod.prefill(cache, slots, tokens, acts, known)
    for _ in range(3):
        a = torch.rand(2, cfg.action_dim, generator=g) * 2 - 1
        l_ref, r_ref, d_ref = ref.step(caches[0], slots, a)
        logits, reward, done = m.step(caches[1], slots, a)  # [2, N, V], [2], [2]
        assert logits.shape == l_ref.shape and bool(torch.isfinite(logits.float()).all())
        rel = float((logits.float() - l_ref).norm() / l_ref.norm())
        assert rel < 0.05, rel
        torch.testing.assert_close(done.float(), d_ref, atol=0.05, rtol=0)
        torch.testing.assert_close(reward.float(), r_ref, atol=0.1, rtol=0.1)
        nxt = l_ref.argmax(-1)
        for cache in caches:
            cache.last_tokens[slots] = nxt
            cache.frames[slots] += 1
    img, img_ref = m.decode(nxt), ref.decode(nxt)  # uint8 [2, H, W, 3]
    assert img.dtype == torch.uint8 and img.shape == (2, cfg.height, cfg.width, 3)
    assert float((img.float() - img_ref.float()).abs().mean()) < 3.0


def agreement_and_loss(ref_model, model, eps):
    """Token agreement of `model`'s free-running greedy rollouts with fp32's (tokens of the predicted frames,
    through the fp32 tokenizer) and its PSNR loss at step 8 against the truth."""
    want, _, _ = open_loop(ref_model, eps)
    got, _, _ = open_loop(model, eps)
    enc = lambda f: ref_model.encode(torch.from_numpy(f.reshape(-1, *f.shape[2:])))  # noqa: E731
    agree = float((enc(got) == enc(want)).float().mean())
    r_ref, r = evaluate(ref_model, eps), evaluate(model, eps)
    return agree, gate_loss(r_ref.model_psnr, r.model_psnr)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_tiny_quality_gate(precision):
    # the serving gate: PSNR at step 8 loses <= 0.5 dB and >= 99 % of tokens agree with fp32, held-out rollouts
    ref = load_model_dir(MODEL_DIR)
    eps = heldout_episodes(8)
    assert len(eps[0][0]) > CONTEXT
    model = ref.to(torch.bfloat16) if precision == "bf16" else quantize_model(ref, "int8")
    ref = load_model_dir(MODEL_DIR)  # .to() above converted in place
    agree, loss = agreement_and_loss(ref, model, eps)
    assert agree >= 0.99, agree
    assert loss <= GATE_DB, loss


@torch.no_grad()
def test_compiled_fsq_tokenizer_at_bf16():
    # the compile (and ONNX / TensorRT export) paths trace the same encode: bf16 must trace too
    from worldserve.runtime.compiled import compile_model

    cfg = dataclasses.replace(PRESETS["base"], d_model=64, n_layers=1, n_heads=2, tok_channels=16)
    m = build(cfg, seed=1).to(torch.bfloat16)
    c = compile_model(m)
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    tok = c.encode(frames)
    assert tok.shape == (3, cfg.tokens_per_frame)
    assert float((tok == m.encode(frames)).float().mean()) > 0.9
    img = c.decode(tok)
    assert float((img.float() - m.decode(tok).float()).abs().mean()) < 2.0


@pytest.mark.parametrize(("kw", "match"), [
    (dict(precision="fp16"), "fp16 runs on a GPU only"),
    (dict(precision="fp8"), "fp8 needs an NVIDIA GPU"),
    (dict(backend="onnxruntime", precision="bf16"), "onnxruntime serves fp32 or int8, not bf16"),
    (dict(backend="tensorrt"), "tensorrt needs an NVIDIA GPU"),
])
def test_unsupported_combinations_refused_at_startup(kw, match):
    ms = ModelSettings(**kw)
    with pytest.raises(Unsupported, match=match) as e:
        check_supported(ms)
    assert f"--backend {ms.backend} --precision {ms.precision}" in str(e.value)  # names the combination


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_without_gpu_refused():
    with pytest.raises(Unsupported, match="no CUDA GPU"):
        check_supported(ModelSettings(device="cuda", precision="bf16"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_supported_cpu_combinations_pass(precision):
    check_supported(ModelSettings(precision=precision))
    check_supported(ModelSettings(precision=precision, backend="compile"))
    if precision != "bf16":
        check_supported(ModelSettings(precision=precision, backend="onnxruntime"))


def test_tensorrt_precision_refusals():
    flags10 = {"TF32", "FP16", "BF16", "INT8", "FP8"}
    assert check_trt_precision("fp8", "10.3", flags10, (9, 0)) is None
    assert "compute capability >= 8.9" in check_trt_precision("fp8", "10.3", flags10, (8, 0))
    assert "no builder flag BF16" in check_trt_precision("bf16", "8.6.1", {"TF32", "FP16", "INT8", "FP8"}, (9, 0))
    assert "compute capability >= 8.0" in check_trt_precision("bf16", "10.3", flags10, (7, 5))
    assert check_trt_precision("fp16", "8.6.1", {"FP16"}, (7, 5)) is None
    assert "must be one of" in check_trt_precision("int4", "10.3", flags10, (9, 0))


def test_served_bf16_model_is_bf16():
    from worldserve.runtime.loader import prepare
    from worldserve.runtime.quantize import quantization_of

    m = prepare(ModelSettings(preset="tiny", precision="bf16", warmup=False))
    assert quantization_of(m) == "bf16"
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    assert m.decode(m.encode(torch.from_numpy(frames))).shape == (1, 64, 64, 3)
