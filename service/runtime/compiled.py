"""torch.compile backend: the step, encode and decode graphs compiled, with CUDA graphs on a GPU.

    step    the pure StepGraph behind a gather from the cache (read inside the compiled graph, so on a GPU the
            cache is a static input of the CUDA graph and never copied); the new frame's keys/values are
            scattered into the cache outside it. Shapes are static per bucket: the engine pads step batches to
            1, 2, 4, ... and encode / decode batches are padded here to the next power of two, so each
            bucket compiles once (at warmup) and is replayed after.
    mode    "reduce-overhead" (CUDA graphs) on a GPU, inductor's default on the CPU.

CUDA graph outputs live in memory the next replay overwrites. The step's small outputs (reward, done) are cloned
(callers such as evaluate.open_loop keep rewards across steps); its logits ([B, N, V]: 0.5 GB at base, 64 rows) are
NOT: they are valid until the next call of this model (the engine samples them and takes their confidence before
it decodes), and its new keys / values go into the cache before `step` returns. Encode / decode outputs are cloned
(a batch over GPU_CHUNK rows is several replays). Prefill stays eager (once per request).
"""

from __future__ import annotations

import logging

import torch

from ..model.world_model import WorldModel
from .batch import pow2
from .graphs import BackendModel, DecodeGraph, EncodeGraph, StepGraph, scatter, step_inputs

log = logging.getLogger("worldserve.runtime")
RECOMPILE_LIMIT = 64  # one graph per (bucket, graph): 1..4096 covers 13 buckets


class _GatherStep(torch.nn.Module):
    """Gather the slots' cache, then StepGraph: (cache k, v, last_tokens, frames, slots, actions, known) -> ..."""

    def __init__(self, dynamics):
        super().__init__()
        self.graph = StepGraph(dynamics)

    def forward(self, k, v, last_tokens, frames, slots, actions, known=None):
        # k, v [L, S, W, N, d]; last_tokens [S, N]; frames [S]; slots [B]
        # -> logits [B, N, V], reward [B], done [B], k_new / v_new [L, B, N, d], frame index [B]
        f = frames[slots]
        out = self.graph(last_tokens[slots], f, k[:, slots], v[:, slots], actions, known)
        return (*out, f)


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    # [B, ...] -> [n, ...] repeating the last row (valid input; the extra rows are dropped after)
    return x if x.shape[0] == n else torch.cat([x, x[-1:].expand(n - x.shape[0], *x.shape[1:])])


class CompiledWorldModel(BackendModel):
    backend = "compile"

    def __init__(self, model: WorldModel, mode: str | None = None, cudagraphs: bool | None = None):
        super().__init__(model)
        device = next(model.parameters()).device
        self.cudagraphs = device.type == "cuda" if cudagraphs is None else cudagraphs
        self.mode = mode or ("reduce-overhead" if self.cudagraphs else None)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        opts = dict(mode=self.mode, dynamic=False, fullgraph=True)
        self._step = torch.compile(_GatherStep(model.dynamics).eval(), **opts)
        self._encode = torch.compile(EncodeGraph(model.tokenizer).eval(), **opts)
        self._decode = torch.compile(DecodeGraph(model.tokenizer).eval(), **opts)

    @classmethod
    def build(cls, model: WorldModel, ms=None) -> CompiledWorldModel:
        return cls(model)

    def allocate_cache(self, slots: int, device=None, dtype=None):
        cache = self.model.allocate_cache(slots, device, dtype)
        if self.cudagraphs:  # the cache is read inside the CUDA graph: keep its address, never copy it
            for t in (cache.k, cache.v, cache.last_tokens, cache.frames):
                torch._dynamo.mark_static_address(t)
        return cache

    def _run(self, fn, *args, keep=None):
        # keep: indices of the outputs cloned out of CUDA graph memory (None: all of them)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
        if not self.cudagraphs:
            return out
        return tuple(o.clone() if keep is None or i in keep else o for i, o in enumerate(out))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> int64 [B, N]
        b = frames.shape[0]
        (tokens,) = self._run(lambda x: (self._encode(x),), _pad_rows(frames, pow2(b)))
        return tokens[:b]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # int64 [B, N] -> uint8 [B, H, W, 3]
        b = tokens.shape[0]
        (frames,) = self._run(lambda x: (self._decode(x),), _pad_rows(tokens, pow2(b)))
        return frames[:b]

    @torch.no_grad()
    def step(self, cache, slots, actions, known=None):
        # slots int64 [B] (the engine pads B to a bucket); actions [B] | [B, A] -> logits [B, N, V], reward, done [B]
        acts, known = step_inputs(self.model, actions, known)
        args = (cache.k, cache.v, cache.last_tokens, cache.frames, slots, acts)
        args += (known,) if known is not None else ()
        # logits stay in graph memory (valid until the next call); k_new / v_new / frames are scattered right here
        logits, reward, done, k_new, v_new, frames = self._run(self._step, *args, keep=(1, 2))
        scatter(cache, slots, frames, k_new, v_new)
        return logits, reward, done


def compile_model(model: WorldModel, ms=None) -> CompiledWorldModel:
    """The serving model behind torch.compile (the loader's backend 'compile')."""
    log.info("torch.compile backend (mode=%s); graphs compile on first use of each bucket",
             "reduce-overhead" if next(model.parameters()).is_cuda else "default")
    return CompiledWorldModel(model)
