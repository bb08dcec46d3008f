"""TensorRT backend (NVIDIA GPU): engines built from the same ONNX graphs as onnx_backend.py.

    build   export encoder / decoder / step to ONNX (dynamic batch), parse each with the TensorRT ONNX parser,
            one optimization profile per batch bucket (min = opt = max = bucket, so every bucket gets kernels
            tuned for exactly its shape), precision flags from the serving precision, a timing cache shared by
            every build on this GPU + TensorRT version (rebuilds take seconds instead of minutes). The plans
            are cached with the ONNX files under ms.artifact_dir (artifacts.py: keyed by weights hash,
            precision, device name, library versions; corrupt or stale plans are rebuilt).
    run     one execution context per (graph, profile); inputs are padded to the bucket, bound by address
            (torch CUDA tensors, no copies) and run on torch's current stream; the step gathers / scatters the
            KV cache around the engine exactly like the ONNX Runtime backend.

Precision: fp32 (TF32 allowed), fp16 / bf16 (the model is converted before export, the flag lets TensorRT
pick half kernels), int8 (weights arrive as DequantizeLinear int8 per-channel + MatMul: weight-only
quantization; INT8 + FP16 flags), fp8 (FP8 + FP16 flags). Not runnable on the development machine (no GPU,
no tensorrt); the loader stops with a clear message when tensorrt is not importable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.world_model import WorldModel
from .artifacts import load_or_build
from .batch import buckets
from .graphs import BackendModel, gather, scatter, step_inputs
from .onnx_backend import GRAPHS, export_graphs, export_key
from .quantize import quantization_of
from .support import Unsupported, precision_flags

log = logging.getLogger("worldserve.runtime")
WORKSPACE_BYTES = 8 << 30
DEFAULT_MAX_BATCH = 64  # EngineSettings.max_slots default; used when something steps before any cache exists
PAD_SLOTS = 1  # the engine allocates max_slots + 1 slots: one scratch slot that padding rows write into (+ its
# context cache's slots, engine/context_cache.py, which no step touches: the engine sets DeferredTrt.max_step_rows)


def engine_max_batch(state_slots: int) -> int:
    """The most rows one step of an engine whose state has `state_slots` slots can carry (its max_slots): the
    engine pads step batches to bucket(n, max_slots) <= max_slots. `serve` (DeferredTrt) builds for this and
    `worldserve export --max-slots M` for M, so both ask the artifact cache for the same key."""
    return max(1, state_slots - PAD_SLOTS)


def graph_buckets(graph: str, max_batch: int) -> list[int]:
    """Batch sizes each graph gets a profile for: every bucket the engine pads a step (or decode) batch of at most
    max_batch rows to (runtime.batch.buckets). Encode takes whole contexts (up to W frames per request): 8x; larger
    encode batches run in chunks of the largest profile."""
    return buckets(max_batch * 8) if graph == "encoder" else buckets(max_batch)


def profile_plan(max_batch: int, only: list[int] | None = None) -> dict[str, list[int]]:
    """{graph: profile batch sizes} built for an engine of max_batch slots. only: a reduced set of sizes for every
    graph (bench/gpu_check: one profile, built in a fraction of the time; a batch runs in the smallest profile that
    holds it, larger encode / decode batches in chunks of the largest)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if only:
        return {g: sorted(set(only)) for g in GRAPHS}
    return {g: graph_buckets(g, max_batch) for g in GRAPHS}


def profile_shapes(input_shapes: dict[str, tuple[int, ...]], batch_axis: dict[str, int], b: int):
    """{input: shape} of one profile: each input's batch axis set to b (input_shapes hold the exported batch)."""
    out = {}
    for name, shape in input_shapes.items():
        s = list(shape)
        s[batch_axis[name]] = b
        out[name] = tuple(s)
    return out


def batch_axis_of(name: str) -> int:
    return 1 if name in ("k_ctx", "v_ctx", "k_new", "v_new") else 0


def _torch_dtype(trt, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8,
             trt.bfloat16: torch.bfloat16}
    return table[dt]


def build_engine(onnx_path: Path, plan_path: Path, precision: str, buckets: list[int], timing_cache: Path,
                 say: Callable[[str], None] = log.info) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weight files next to the .onnx
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in precision_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = {t.name: tuple(t.shape) for t in inputs}  # batch axis is -1 (dynamic)
    for b in buckets:
        profile = builder.create_optimization_profile()
        for name, shape in profile_shapes(shapes, {n: batch_axis_of(n) for n in shapes}, b).items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
    say(f"building TensorRT engine {plan_path.name} ({precision}, profiles {buckets})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


class _Engine:
    """One deserialized engine: a context per profile; run(inputs) pads to the bucket and returns outputs."""

    def __init__(self, trt, runtime, plan: bytes, buckets: list[int], device: torch.device):
        self.trt, self.device = trt, device
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine plan")
        self.buckets = buckets
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.contexts = []
        stream = torch.cuda.current_stream(device).cuda_stream
        for i in range(len(buckets)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, stream)
            self.contexts.append(ctx)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feeds: CUDA tensors by input name, all with the same batch b <= the largest bucket -> outputs by name."""
        first = self.inputs[0]
        b = feeds[first].shape[batch_axis_of(first)]
        if b > self.buckets[-1]:
            raise ValueError(f"batch {b} is larger than the largest TensorRT profile ({self.buckets[-1]})")
        idx = next(i for i, x in enumerate(self.buckets) if x >= b)
        nb = self.buckets[idx]
        ctx = self.contexts[idx]
        keep = []
        for name in self.inputs:
            t = feeds[name]
            ax = batch_axis_of(name)
            if t.shape[ax] != nb:  # repeat the last row: valid input, results dropped below
                last = t.narrow(ax, t.shape[ax] - 1, 1)
                t = torch.cat([t, last.expand(*[nb - b if d == ax else -1 for d in range(t.dim())])], ax)
            t = t.to(self.device, _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))).contiguous()
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            o = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return {n: o.narrow(batch_axis_of(n), 0, b) for n, o in zip(self.outputs, outs, strict=True)}


class TrtWorldModel(BackendModel):
    backend = "tensorrt"

    def __init__(self, model: WorldModel, path: Path, plan: dict[str, list[int]]):
        import tensorrt as trt

        super().__init__(model)
        self.path = Path(path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dev = next(model.parameters()).device  # the model's GPU (cuda:N), never a hard-coded "cuda"
        with torch.cuda.device(dev):
            self.engines = {g: _Engine(trt, runtime, (self.path / f"{g}.plan").read_bytes(),
                                       plan[g], dev) for g in GRAPHS}
        self.max_encode = plan["encoder"][-1]

    @classmethod
    def build(cls, model: WorldModel, ms, max_batch: int = DEFAULT_MAX_BATCH, say: Callable[[str], None] = log.info,
              defer: bool = False, only: list[int] | None = None) -> TrtWorldModel | DeferredTrt:
        """Engines with a profile for every bucket up to max_batch. defer=True (the serving loader): built when the
        engine allocates its cache (Engine.__init__, still at start-up), for as many rows as the cache has slots,
        so the profiles follow max_slots whatever it is set to."""
        if defer:
            return DeferredTrt(model, ms, say)
        import tensorrt as trt

        device = next(model.parameters()).device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise Unsupported(f"backend 'tensorrt' needs an NVIDIA GPU (device cuda), not {ms.device}")
        precision = quantization_of(model)
        gpu = torch.cuda.get_device_name(device).replace(" ", "_")
        plan = profile_plan(max_batch, only)
        key = export_key(model, cls.backend, gpu, precision) | {"max_batch": max_batch, "profiles": plan}
        timing = Path(ms.artifact_dir) / f"trt-timing-{trt.__version__}-{gpu}.cache"

        def build_all(out: Path) -> None:
            export_graphs(model, out, say)
            for g in GRAPHS:
                build_engine(out / f"{g}.onnx", out / f"{g}.plan", precision, plan[g], timing, say)

        label = f"{model.cfg.name}-tensorrt-{precision}-{gpu}" + (f"-only{'-'.join(map(str, plan['step']))}"
                                                                  if only else "")  # never evicts serve's plans
        path = load_or_build(Path(ms.artifact_dir), label, key, build_all, say)
        return cls(model, path, plan)

    def _chunks(self, x: torch.Tensor, graph: str, size: int) -> torch.Tensor:
        # run a graph over any batch: chunks of at most the largest profile
        eng = self.engines[graph]
        outs = [eng.run({eng.inputs[0]: x[i : i + size]})[eng.outputs[0]] for i in range(0, x.shape[0], size)]
        return torch.cat(outs)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> int64 [B, N]
        return self._chunks(frames.to(self.device), "encoder", self.max_encode).to(torch.int64)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # int64 [B, N] -> uint8 [B, H, W, 3]
        return self._chunks(tokens.to(self.device), "decoder", self.engines["decoder"].buckets[-1])

    @torch.no_grad()
    def step(self, cache, slots, actions, known=None):
        # slots int64 [B] (B <= max_batch) -> logits [B, N, V], reward [B], done_prob [B]
        tokens, frames, k_ctx, v_ctx = gather(cache, slots)
        acts, known = step_inputs(self.model, actions, known)
        values = {"tokens": tokens, "frames": frames, "k_ctx": k_ctx, "v_ctx": v_ctx, "actions": acts, "known": known}
        eng = self.engines["step"]
        out = eng.run({n: values[n] for n in eng.inputs})
        scatter(cache, slots, frames, out["k_new"], out["v_new"])
        return out["logits"], out["reward"], out["done"]


class DeferredTrt(BackendModel):
    """TensorRT engines built once the slot count is known: the first allocate_cache(slots) builds profiles for
    every bucket up to the engine's max_slots (engine_max_batch: the cache has one padding slot more), then
    delegates."""

    backend = "tensorrt"

    def __init__(self, model: WorldModel, ms, say: Callable[[str], None]):
        super().__init__(model)
        self.ms, self.say = ms, say
        self.built: TrtWorldModel | None = None
        self.max_step_rows: int | None = None  # the engine's max_slots (set by Engine before it allocates)

    def _max_batch(self, state_slots: int) -> int:
        return self.max_step_rows or engine_max_batch(state_slots)

    def _ensure(self, max_batch: int) -> TrtWorldModel:
        if self.built is None:
            self.built = TrtWorldModel.build(self.model, self.ms, max_batch, self.say)
        return self.built

    def allocate_cache(self, slots: int, device=None, dtype=None):
        self._ensure(self._max_batch(slots))  # max_slots, as `worldserve export --max-slots` builds it
        return self.model.allocate_cache(slots, device, dtype)

    def encode(self, frames):
        return self._ensure(DEFAULT_MAX_BATCH).encode(frames)

    def decode(self, tokens):
        return self._ensure(DEFAULT_MAX_BATCH).decode(tokens)

    def step(self, cache, slots, actions, known=None):
        return self._ensure(self._max_batch(cache.slots)).step(cache, slots, actions, known)
