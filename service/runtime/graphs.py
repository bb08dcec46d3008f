"""The model as pure graphs for compiled / exported backends, and the wrapper they share.

Dynamics.step writes into the KV cache while it runs; a graph that ONNX Runtime, TensorRT or a CUDA
graph replays must not. StepGraph runs the same `Dynamics.step_with` as a pure function (its window is selected,
not written):

    tokens   int64 [B, N]            the slots' last_tokens (input frame)
    frames   int64 [B]               frame index being written (ring position = frames % W)
    k_ctx    float [L, B, W, N, d]   the slots' cache before this step (gathered)
    v_ctx    float [L, B, W, N, d]
    actions  int64 [B] | float [B, A]
    known    bool [B]                continuous models only (False = "unknown action")
 -> logits [B, N, V], reward [B], done_prob [B], k_new [L, B, N, d], v_new [L, B, N, d]

The caller gathers the slots before and scatters k_new / v_new at ring position `frames % W` after
(`gather`, `scatter`), which leaves the cache exactly as Dynamics.step leaves it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..model.dynamics import Dynamics, KVCache
from ..model.memory import check_state_fits
from ..model.world_model import WorldModel

log = logging.getLogger("worldserve.runtime")


class StepGraph(nn.Module):
    def __init__(self, dynamics: Dynamics):
        super().__init__()
        self.dyn = dynamics

    def forward(self, tokens, frames, k_ctx, v_ctx, actions, known=None):
        # Dynamics.step_with with a window that selects this frame's keys / values at its ring position
        # instead of writing them into the cache; they are returned for the caller's `scatter`
        blk0, w = self.dyn.blocks[0], self.dyn.cfg.window
        b, n = tokens.shape
        ring = torch.arange(w, device=frames.device)[None, :]  # [1, W]
        here = (ring == (frames % w)[:, None])[:, :, None, None]  # bool [B, W, 1, 1]: this frame's ring entry
        k_out, v_out = [], []

        def window_kv(layer: int, k: torch.Tensor, v: torch.Tensor):
            kf, vf = k.to(k_ctx.dtype), v.to(v_ctx.dtype)  # [B, N, d], as the cache stores them
            k_out.append(kf)
            v_out.append(vf)
            kk = torch.where(here, kf[:, None], k_ctx[layer])  # [B, W, N, d]
            vv = torch.where(here, vf[:, None], v_ctx[layer])
            heads = (b, w * n, blk0.n_heads, blk0.head_dim)
            return kk.reshape(heads).transpose(1, 2), vv.reshape(heads).transpose(1, 2)

        logits, reward, done = self.dyn.step_with(tokens, frames, actions, known, window_kv)
        return logits, reward, torch.sigmoid(done), torch.stack(k_out), torch.stack(v_out)


class EncodeGraph(nn.Module):
    # uint8 [B, H, W, 3] -> int64 [B, N]
    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tok = tokenizer

    def forward(self, frames):
        return self.tok.encode(frames)


class DecodeGraph(nn.Module):
    # int64 [B, N] -> uint8 [B, H, W, 3]
    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tok = tokenizer

    def forward(self, tokens):
        return self.tok.decode(tokens)


def gather(cache: KVCache, slots: torch.Tensor):
    # slots int64 [B] -> tokens [B, N], frames [B], k_ctx / v_ctx [L, B, W, N, d] (copies)
    return cache.last_tokens[slots], cache.frames[slots], cache.k[:, slots], cache.v[:, slots]


def scatter(cache: KVCache, slots: torch.Tensor, frames: torch.Tensor, k_new, v_new) -> None:
    # k_new / v_new [L, B, N, d] -> cache ring position frames % W of each slot
    ring = frames % cache.k.shape[2]
    cache.k[:, slots, ring] = k_new.to(cache.k.dtype)
    cache.v[:, slots, ring] = v_new.to(cache.v.dtype)


def step_inputs(model: WorldModel, actions, known):
    """Actions as the graphs take them: continuous models always get a known mask (all True if None)."""
    if model.cfg.continuous:
        actions = actions.to(torch.float32)
        if known is None:
            known = torch.ones(actions.shape[0], dtype=torch.bool, device=actions.device)
        return actions, known
    return actions.to(torch.int64), None


class BackendModel:
    """What every wrapped backend shares with WorldModel: spec, cache, prefill (eager), actions, parameters.

    Subclasses implement encode / decode / step. `model` stays the eager PyTorch model (the reference and
    the prefill path); its parameters tell the engine which device the cache lives on.
    """

    backend = "eager"

    def __init__(self, model: WorldModel):
        self.model = model
        self.cfg = model.cfg

    @property
    def spec(self):
        return self.model.spec

    @property
    def device(self) -> torch.device:
        return self.model.device

    def allocate_cache(self, slots: int, device=None, dtype=None) -> KVCache:
        return self.model.allocate_cache(slots, device, dtype)

    def allocate_state(self, slots: int) -> KVCache:  # the protocol's name (worldserve.model.protocol)
        # checked against free memory and logged like WorldModel's; then through the backend's allocate_cache:
        # compile marks the cache static for CUDA graphs, TensorRT builds its profiles for this many slots
        p = next(self.model.parameters())
        log.info(check_state_fits(self.cfg, slots, p.device, p.dtype))
        return self.allocate_cache(slots)

    def fork(self, cache, src: int, dst: torch.Tensor) -> None:
        self.model.fork(cache, src, dst)

    def advance(self, cache, slots, tokens) -> None:
        self.model.advance(cache, slots, tokens)

    def prefill(self, cache, slots, tokens, actions, known=None):
        return self.model.prefill(cache, slots, tokens, actions, known)

    def unknown_actions(self, batch: int, count: int, device=None):
        return self.model.unknown_actions(batch, count, device)

    def parameters(self):
        return self.model.parameters()

    def param_counts(self) -> dict[str, int]:
        return self.model.param_counts()

    def flops_per_frame(self) -> dict[str, float]:
        return self.model.flops_per_frame()

    def eval(self):
        return self
