"""ONNX Runtime backend vs eager PyTorch: held-out rollouts, continuous actions, the engine, the artifact cache."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import MODEL_DIR
from worldserve.engine.engine import Engine
from worldserve.lab.evaluate import CONTEXT, HORIZON, evaluate, heldout_episodes
from worldserve.messages import RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.dynamics import advance
from worldserve.model.io import load_model_dir
from worldserve.model.quality import gate_verdict, passes_gate, psnr
from worldserve.model.sampling import sample
from worldserve.model.world_model import build
from worldserve.runtime import artifacts
from worldserve.runtime.onnx_backend import OnnxWorldModel
from worldserve.runtime.parity import lockstep
from worldserve.runtime.quantize import quantize_model
from worldserve.settings import EngineSettings, ModelSettings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    eager = load_model_dir(MODEL_DIR)
    ms = ModelSettings(dir=MODEL_DIR, backend="onnxruntime", artifact_dir=tmp_path_factory.mktemp("artifacts"))
    return eager, OnnxWorldModel.build(eager, ms), ms


@torch.no_grad()
def greedy_rollout(model, eps):
    """Free-running greedy open loop on held-out episodes: tokens int64 [E, H, N], frames uint8 [E, H, 64, 64, 3]."""
    e = len(eps)
    ctx = torch.from_numpy(np.stack([f[:CONTEXT] for f, *_ in eps]))
    acts = torch.from_numpy(np.stack([a[: CONTEXT - 1 + HORIZON] for _, a, *_ in eps]))
    tokens = model.encode(ctx.flatten(0, 1)).view(e, CONTEXT, -1)
    cache, slots, zeros = model.allocate_cache(e), torch.arange(e), torch.zeros(e, dtype=torch.int64)
    model.prefill(cache, slots, tokens, acts[:, : CONTEXT - 1])
    toks, frames = [], []
    for h in range(HORIZON):
        logits, _, _ = model.step(cache, slots, acts[:, CONTEXT - 1 + h])
        nxt = sample(logits, torch.zeros(e), zeros, zeros, zeros + h)
        advance(cache, slots, nxt)
        toks.append(nxt)
        frames.append(model.decode(nxt))
    return torch.stack(toks, 1), torch.stack(frames, 1)


def test_heldout_rollouts_match_eager(models):
    eager, onnx, _ = models
    eps = heldout_episodes(6)
    tok_e, fr_e = greedy_rollout(eager, eps)
    tok_o, fr_o = greedy_rollout(onnx, eps)
    assert float((tok_o == tok_e).float().mean()) >= 0.99
    assert psnr(float(((fr_o.float() - fr_e.float()) ** 2).mean())) >= 40.0
    ctx = torch.from_numpy(eps[0][0][:CONTEXT])
    assert torch.equal(onnx.encode(ctx), eager.encode(ctx))


def test_onnx_int8_within_gate(models, tmp_path):
    # ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits (8-bit weights, int8 compute): a variant of
    # its own, held to the same gate against fp32 on held-out rollouts
    eager, _, _ = models
    eps = heldout_episodes(6)
    ref = evaluate(eager, eps)
    res = evaluate(OnnxWorldModel.build(quantize_model(eager, "int8"), ModelSettings(artifact_dir=tmp_path)), eps)
    assert passes_gate(ref.model_psnr, res.model_psnr), gate_verdict(ref.model_psnr, res.model_psnr, "variant")


def test_engine_runs_on_onnx(models):
    """The engine drives the ONNX model through the same interface; sampled rollouts agree with eager."""
    eager, onnx, _ = models
    f, a, *_ = heldout_episodes(1)[0]
    acts = np.stack([a[CONTEXT - 1 : CONTEXT + 3], a[CONTEXT : CONTEXT + 4]]).astype(np.int64)  # [K=2, T=4]

    def run(model):
        events = []
        eng = Engine(model, EngineSettings(max_slots=8))
        eng.submit(RolloutRequest("r", "tiny", f[:CONTEXT], acts, return_tokens=True, seed=7, temperature=1.0))
        while not any(e.final for e in events):
            events.extend(eng.step())
        return {(e.candidate, e.step): e for e in events if not e.final}

    ref, got = run(eager), run(onnx)
    assert ref.keys() == got.keys() and len(ref) == 8
    agree = np.mean([np.mean(ref[k].tokens == got[k].tokens) for k in ref])
    assert agree >= 0.99
    assert all(abs(ref[k].reward - got[k].reward) < 1e-4 for k in ref)


def test_continuous_actions_small_model(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, window=4, n_actions=0, action_dim=3,
                              action_names=())
    m = build(cfg, seed=2)
    o = OnnxWorldModel.build(m, ModelSettings(artifact_dir=tmp_path))
    assert o.step_inputs[-1] == "known"
    slots = torch.tensor([1, 3])
    ce, co = m.allocate_cache(4), o.allocate_cache(4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 3, cfg.tokens_per_frame))
    acts, known = m.unknown_actions(2, 2)
    known[0, 1] = True
    for cache, mod in ((ce, m), (co, o)):
        mod.prefill(cache, slots, tokens, acts, known)
    acts = [(torch.randn(2, 3), torch.tensor([True, s % 2 == 0])) for s in range(6)]
    for (le, _, de), (lo, _, do) in lockstep(m, o, ce, co, slots, acts):
        torch.testing.assert_close(lo, le, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(do, de, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(co.k, ce.k, atol=1e-4, rtol=1e-4)


def test_artifact_is_cached_and_corruption_detected(models, tmp_path):
    eager, onnx, ms = models
    again = OnnxWorldModel.build(eager, ms)  # same weights, backend, precision, versions: no rebuild
    assert again.path == onnx.path
    key = json.loads((onnx.path / artifacts.MANIFEST).read_text())["key"]
    assert key["backend"] == "onnxruntime" and key["precision"] == "fp32" and key["versions"]["onnxruntime"]
    assert artifacts.check(onnx.path, key) is None
    copy = tmp_path / "copy"
    shutil.copytree(onnx.path, copy)
    data = copy / "step.onnx.data" if (copy / "step.onnx.data").exists() else copy / "step.onnx"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert "sha256" in artifacts.check(copy, key)
    assert "stale" in artifacts.check(onnx.path, {**key, "weights": "0" * 64})


def test_load_or_build_rebuilds_stale_and_corrupt(tmp_path):
    builds = []

    def build_fn(d):
        builds.append(d)
        (d / "graph.bin").write_bytes(b"weights" * 100)

    key = {"weights": "a", "backend": "onnxruntime"}
    p1 = artifacts.load_or_build(tmp_path, "m", key, build_fn)
    assert artifacts.load_or_build(tmp_path, "m", key, build_fn) == p1 and len(builds) == 1
    (p1 / "graph.bin").write_bytes(b"truncated")
    assert artifacts.load_or_build(tmp_path, "m", key, build_fn) == p1 and len(builds) == 2
    assert artifacts.check(p1, key) is None
    (p1 / artifacts.MANIFEST).write_text("{not json")
    artifacts.load_or_build(tmp_path, "m", key, build_fn)
    assert len(builds) == 3
    p2 = artifacts.load_or_build(tmp_path, "m", {**key, "weights": "b"}, build_fn)
    assert p2 != p1 and len(builds) == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-built directories left
