"""TensorRT build plan without TensorRT: profiles follow the engine's buckets up to max_slots, fp8 weights reach
ONNX as Q/DQ (DequantizeLinear of float8), and the start-up refusal when TensorRT cannot build."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.runtime.batch import bucket
from worldserve.runtime.onnx_backend import GRAPHS, export_graphs
from worldserve.runtime.quantize import Fp8Linear, target_layers
from worldserve.runtime.trt_backend import profile_plan


@pytest.mark.parametrize("max_slots", [1, 3, 64, 100, 256])
def test_profiles_cover_every_bucket_the_engine_pads_to(max_slots):
    plan = profile_plan(max_slots)
    assert set(plan) == set(GRAPHS)
    for b in range(1, max_slots + 1):  # the engine steps (and decodes) at most max_slots rows, padded to bucket()
        assert bucket(b, max_slots) in plan["step"]
        assert bucket(b, max_slots) in plan["decoder"]
    assert plan["step"][-1] == max_slots and plan["step"] == sorted(set(plan["step"]))
    assert plan["encoder"][-1] == 8 * max_slots  # whole contexts; bigger encode batches run in chunks
    with pytest.raises(ValueError):
        profile_plan(0)


def test_fp8_weights_export_as_dequantize_linear(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=32, n_layers=1, n_heads=2, window=2)
    m = build(cfg, seed=0)
    names = target_layers(m)
    for name in names:  # quantize_model refuses fp8 without a Hopper GPU; the export does not need one
        parent, _, attr = name.rpartition(".")
        mod = m.dynamics.get_submodule(parent) if parent else m.dynamics
        setattr(mod, attr, Fp8Linear.from_linear(getattr(mod, attr)))
    m.quantization = "fp8"
    export_graphs(m, tmp_path, say=lambda _: None)
    g = onnx.load(str(tmp_path / "step.onnx")).graph
    f8 = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    assert len(f8) == len(names)  # the weights stay float8 in the file
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert {n.input[0] for n in dq} >= f8  # ... and reach the graph through DequantizeLinear (Q/DQ) ...
    assert not [n for n in g.node if n.op_type == "Cast" and n.input[0] in f8]  # ... never a Cast from float8
    import onnxruntime as ort  # the graph is valid ONNX that a runtime executes

    sess = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"tokens": np.zeros((2, cfg.tokens_per_frame), np.int64)})[0]
    assert out.shape == (2, 64, 64, 3)
    with torch.no_grad():
        x = torch.randn(3, 32)
        lin = m.dynamics.blocks[0].fc1
        ref = torch.nn.functional.linear(x, (lin.weight_f8.float() * lin.scale[:, None]), lin.bias)
        torch.testing.assert_close(lin(x), ref)
