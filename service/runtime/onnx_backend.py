"""ONNX export of the world model's three graphs, and ONNX Runtime (CPU) serving them.

    encoder.onnx  frames uint8 [B, H, W, 3]                                  -> tokens int64 [B, N]
    decoder.onnx  tokens int64 [B, N]                                        -> frames uint8 [B, H, W, 3]
    step.onnx     tokens [B, N], frames [B], k_ctx / v_ctx [L, B, W, N, d],
                  actions [B] | [B, A] (+ known bool [B] if continuous)   -> logits [B, N, V], reward [B],
                                                                             done [B], k_new / v_new [L, B, N, d]

One export with a dynamic batch dimension serves every bucket: ONNX Runtime's CPU kernels do not specialise
on static shapes, and TensorRT builds one optimization profile per bucket from the same file
(trt_backend.py). Exporting per bucket would multiply the build time by the number of buckets for no gain.
The KV cache stays a torch KVCache: the step gathers the slots' cache, runs the graph and scatters the new
frame's keys/values back (graphs.gather / graphs.scatter). Prefill stays in PyTorch (once per request).
Artifacts are cached under ms.artifact_dir (artifacts.py), keyed by weights hash, backend, precision,
device and library versions; a stale or corrupt artifact is rebuilt.
int8: the export carries DequantizeLinear(int8 weight, per-channel scale, zero point 0) + MatMul, which ONNX
Runtime's optimizer fuses into MatMulNBits (8-bit weights, accuracy level 4: activations quantized per block
of 32 and multiplied in int8). It is a real int8 CPU kernel and not bit-equal to eager int8 (logits
within ~2e-2), so it is checked against fp32 on held-out rollouts like any other quantized variant.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.world_model import WorldModel
from .artifacts import library_versions, load_or_build, weights_hash
from .fp8_qdq import onnx_translations
from .graphs import BackendModel, DecodeGraph, EncodeGraph, StepGraph, gather, scatter, step_inputs
from .quantize import quantization_of
from .support import Unsupported

log = logging.getLogger("worldserve.runtime")
EXPORT_FORMAT = 2  # bump when the exported graphs change meaning (2: fp8 weights as DequantizeLinear)
OPSET = 18  # 19 for fp8 weights (DequantizeLinear of float8e4m3fn)
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension (encode batches every admitted context frame)
GRAPHS = ("encoder", "decoder", "step")


def step_io_names(model: WorldModel) -> tuple[list[str], list[str]]:
    inputs = ["tokens", "frames", "k_ctx", "v_ctx", "actions"] + (["known"] if model.cfg.continuous else [])
    return inputs, ["logits", "reward", "done", "k_new", "v_new"]


def example_inputs(model: WorldModel, batch: int = 2):
    """Export examples (batch 2: a batch of 1 would specialise the dimension). Returns per graph a tuple."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    frames = torch.zeros(batch, cfg.height, cfg.width, 3, dtype=torch.uint8, device=dev)
    tokens = torch.zeros(batch, cfg.tokens_per_frame, dtype=torch.int64, device=dev)
    cache = model.allocate_cache(batch)
    cache.frames[:] = torch.arange(batch) * (cfg.window + 1)  # one slot past the window, one not
    acts, known = step_inputs(model, model.unknown_actions(batch, 1, dev)[0][:, 0], None)
    t, f, k, v = gather(cache, torch.arange(batch, device=dev))
    step = (t, f, k, v, acts) + ((known,) if known is not None else ())
    return {"encoder": (frames,), "decoder": (tokens,), "step": step}


def opset_for(model: WorldModel) -> int:
    return 19 if quantization_of(model) == "fp8" else OPSET


def export_graphs(model: WorldModel, out: Path, say: Callable[[str], None] = log.info) -> None:
    """Write encoder.onnx, decoder.onnx and step.onnx (dynamic batch) for `model` into `out`."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ex = example_inputs(model)
    step_in, step_out = step_io_names(model)
    specs = {
        "encoder": (EncodeGraph(model.tokenizer), ["frames"], ["tokens"], ({0: batch},)),
        "decoder": (DecodeGraph(model.tokenizer), ["tokens"], ["frames"], ({0: batch},)),
        "step": (StepGraph(model.dynamics), step_in, step_out,
                 tuple({1: batch} if name in ("k_ctx", "v_ctx") else {0: batch} for name in step_in)),
    }
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        for name, (module, ins, outs, dyn) in specs.items():
            t0 = time.perf_counter()
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module.eval(), ex[name], str(out / f"{name}.onnx"), dynamo=True,
                                  opset_version=opset_for(model), input_names=ins, output_names=outs,
                                  dynamic_shapes=dyn, verbose=False, custom_translation_table=onnx_translations())
            say(f"exported {name}.onnx in {time.perf_counter() - t0:.1f} s")
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def export_key(model: WorldModel, backend: str, device: str, precision: str) -> dict:
    return {
        "weights": weights_hash(model), "backend": backend, "precision": precision, "device": device,
        "config": model.cfg.to_dict(), "format": EXPORT_FORMAT, "opset": opset_for(model),
        "versions": library_versions("onnx", "onnxscript", "onnxruntime", "tensorrt"),
    }


class OnnxWorldModel(BackendModel):
    backend = "onnxruntime"

    def __init__(self, model: WorldModel, path: Path, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(model)
        self.path = Path(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sessions = {g: ort.InferenceSession(str(self.path / f"{g}.onnx"), so, providers=["CPUExecutionProvider"])
                         for g in GRAPHS}
        self.step_inputs = [i.name for i in self.sessions["step"].get_inputs()]

    @classmethod
    def build(cls, model: WorldModel, ms, say: Callable[[str], None] = log.info) -> OnnxWorldModel:
        device = torch.device(ms.device)
        if device.type != "cpu":
            raise Unsupported(f"backend 'onnxruntime' runs on the CPU (CPUExecutionProvider), not {ms.device}; "
                             "on a GPU use backend 'tensorrt' or 'compile'")
        precision = quantization_of(model)
        if precision not in ("fp32", "int8"):
            raise Unsupported(f"backend 'onnxruntime' serves fp32 or int8 weights, not {precision}")
        say(f"hashing weights of {model.cfg.name} ({precision})")
        key = export_key(model, cls.backend, "cpu", precision)
        label = f"{model.cfg.name}-{cls.backend}-{precision}-cpu"
        path = load_or_build(Path(ms.artifact_dir), label, key, lambda d: export_graphs(model, d, say), say)
        try:
            return cls(model, path)
        except Exception as e:  # a file ONNX Runtime cannot load, though it hashes right: build it again
            say(f"could not load {path} ({e}); rebuilding")
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            path = load_or_build(Path(ms.artifact_dir), label, key, lambda d: export_graphs(model, d, say), say)
            return cls(model, path)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> int64 [B, N]
        (tokens,) = self.sessions["encoder"].run(None, {"frames": frames.cpu().contiguous().numpy()})
        return torch.from_numpy(tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # int64 [B, N] -> uint8 [B, H, W, 3]
        (frames,) = self.sessions["decoder"].run(None, {"tokens": tokens.cpu().to(torch.int64).contiguous().numpy()})
        return torch.from_numpy(frames)

    @torch.no_grad()
    def step(self, cache, slots, actions, known=None):
        # slots int64 [B]; actions [B] | [B, A] -> logits [B, N, V], reward [B], done_prob [B]
        tokens, frames, k_ctx, v_ctx = gather(cache, slots)
        acts, known = step_inputs(self.model, actions, known)
        values = {"tokens": tokens, "frames": frames, "k_ctx": k_ctx.float(), "v_ctx": v_ctx.float(),
                  "actions": acts, "known": known}
        feeds = {name: values[name].cpu().contiguous().numpy() for name in self.step_inputs}
        logits, reward, done, k_new, v_new = self.sessions["step"].run(None, feeds)
        scatter(cache, slots, frames, torch.from_numpy(k_new), torch.from_numpy(v_new))
        return torch.from_numpy(logits), torch.from_numpy(reward), torch.from_numpy(done)
