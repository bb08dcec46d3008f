"""Precision defaults per device, the dtypes int8 / fp8 serve in, start-up warnings for slow combinations, quantized
layers' storage under .to(dtype), and one TensorRT profile plan for `export` and `serve` (issue 21 item 2)."""

import argparse
import dataclasses

import pytest
import torch

from worldserve.cli.serve import _settings
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.runtime.loader import with_precision
from worldserve.runtime.quantize import Fp8Linear, Int8Linear, quantize_model, target_layers
from worldserve.runtime.support import compute_dtype, performance_warnings
from worldserve.runtime.trt_backend import PAD_SLOTS, engine_max_batch, profile_plan
from worldserve.settings import ModelSettings, Settings


def test_default_precision_follows_the_device(monkeypatch):
    assert ModelSettings().precision == "fp32"  # CPU: unchanged (make serve, the e2e tests)
    assert ModelSettings(device="cuda").precision == "bf16"
    assert ModelSettings(device="cuda:1").precision == "bf16"
    assert ModelSettings(device="cuda", precision="fp32").precision == "fp32"  # an explicit choice stays
    monkeypatch.setenv("WORLDSERVE_MODEL__DEVICE", "cuda")
    assert Settings().model.precision == "bf16"  # the manifests' GPU workers set only the device
    # a --device flag over the environment's CPU default re-derives the precision; an explicit one is kept
    monkeypatch.setenv("WORLDSERVE_MODEL__DEVICE", "cpu")
    assert _settings(argparse.Namespace(device="cuda")).model.precision == "bf16"
    assert _settings(argparse.Namespace(device="cuda", precision="int8")).model.precision == "int8"
    monkeypatch.setenv("WORLDSERVE_MODEL__PRECISION", "fp32")
    assert _settings(argparse.Namespace(device="cuda")).model.precision == "fp32"


def test_compute_dtypes():
    assert compute_dtype("bf16", "cuda") == torch.bfloat16
    assert compute_dtype("int8", "cuda") == torch.bfloat16 and compute_dtype("fp8", "cuda:0") == torch.bfloat16
    assert compute_dtype("int8", "cpu") == torch.float32  # the gated W8A8 path keeps fp32 activations
    assert compute_dtype("fp32", "cuda") == torch.float32


def _small():
    return build(dataclasses.replace(PRESETS["tiny"], d_model=32, n_layers=1, n_heads=2, window=2), seed=0)


def test_quantized_layers_keep_storage_under_a_cast():
    m = quantize_model(_small(), "int8")
    names = target_layers(_small())
    before = {n: (m.dynamics.get_submodule(n).weight_q.clone(), m.dynamics.get_submodule(n).scale.clone())
              for n in names}
    m = m.to(torch.bfloat16)  # what with_precision does on CUDA
    for n, (w, s) in before.items():
        mod = m.dynamics.get_submodule(n)
        assert isinstance(mod, Int8Linear) and mod.weight_q.dtype == torch.int8 and mod.scale.dtype == torch.float32
        assert torch.equal(mod.weight_q, w) and torch.equal(mod.scale, s)
    assert m.dynamics.blocks[0].ln1.weight.dtype == torch.bfloat16  # everything else in bf16 (KV cache, logits)
    assert m.allocate_cache(2).k.dtype == torch.bfloat16
    lin = torch.nn.Linear(32, 16)
    f8 = Fp8Linear.from_linear(lin)
    w = f8.weight_f8.clone()
    f8 = f8.to(torch.bfloat16)  # float8 counts as floating point: a plain cast would re-round it
    assert f8.weight_f8.dtype == torch.float8_e4m3fn and f8.scale.dtype == torch.float32
    assert torch.equal(f8.weight_f8.view(torch.uint8), w.view(torch.uint8))


def test_with_precision_cpu_int8_keeps_fp32_activations():
    q = with_precision(_small(), "int8")
    assert q.quantization == "int8" and q.dynamics.blocks[0].ln1.weight.dtype == torch.float32
    assert with_precision(q, "int8").quantization == "int8"  # a quantized directory is not quantized twice


def test_slow_combinations_are_named():
    cuda = ModelSettings(device="cuda", precision="fp32")
    assert any("fp32 on CUDA" in w for w in performance_warnings(cuda))
    assert any("int8 on CUDA is weight-only" in w
               for w in performance_warnings(ModelSettings(device="cuda", precision="int8", backend="compile")))
    assert not performance_warnings(ModelSettings(device="cuda"))  # the default: bf16
    assert not performance_warnings(ModelSettings(device="cuda", backend="compile"))  # bf16 + CUDA graphs
    assert any("emulated" in w for w in performance_warnings(ModelSettings(precision="bf16"), cpu_flags=" avx2"))
    assert not performance_warnings(ModelSettings(precision="bf16"), cpu_flags=" avx512_bf16")
    assert any("VNNI" in w for w in performance_warnings(ModelSettings(precision="int8"), cpu_flags=" avx2"))
    assert not performance_warnings(ModelSettings())


@pytest.mark.parametrize("max_slots", [1, 8, 64, 100])
def test_export_and_serve_build_the_same_profiles(max_slots):
    # serve: the engine allocates max_slots + 1 slots and DeferredTrt builds for engine_max_batch(that);
    # `worldserve export --max-slots M` builds for M: the same max_batch, so the same artifact key and plans
    state_slots = max_slots + PAD_SLOTS
    assert engine_max_batch(state_slots) == max_slots
    assert profile_plan(engine_max_batch(state_slots)) == profile_plan(max_slots)
    assert profile_plan(max_slots)["step"][-1] == max_slots  # no profile for the padding slot (was 65 at 64)
