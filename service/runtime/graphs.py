"""The model as pure graphs for compiled / exported backends, and the wrapper they share.

Dynamics.step writes into the KV cache while it runs; a graph that ONNX Runtime, TensorRT or a CUDA
graph replays must not. StepGraph is the same computation as a pure function:

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

from ..model.dynamics import Dynamics, KVCache, attention, rope_tables
from ..model.memory import check_state_fits
from ..model.world_model import WorldModel

log = logging.getLogger("worldserve.runtime")


class StepGraph(nn.Module):
    def __init__(self, dynamics: Dynamics):
        super().__init__()
        self.dyn = dynamics

    def forward(self, tokens, frames, k_ctx, v_ctx, actions, known=None):
        dyn, cfg = self.dyn, self.dyn.cfg
        b, n = tokens.shape
        w = cfg.window
        x = dyn.embed(tokens.unsqueeze(1), dyn.embed_actions(actions, known).unsqueeze(1)).view(b, n, -1)  # [B, N, d]
        cos, sin = rope_tables(frames, cfg.head_dim, cfg.rope_base)  # [B, hd/2]
        cos, sin = cos.unsqueeze(1).expand(b, n, -1), sin.unsqueeze(1).expand(b, n, -1)
        pos = torch.arange(w, device=frames.device)[None, :]  # [1, W]
        here = (pos == (frames % w)[:, None])[:, :, None, None]  # bool [B, W, 1, 1]: this frame's ring entry
        valid = pos < torch.clamp(frames + 1, max=w)[:, None]  # [B, W]
        mask = valid.repeat_interleave(n, dim=1)[:, None, None, :]  # [B, 1, 1, W*N]
        k_out, v_out = [], []
        for layer, blk in enumerate(dyn.blocks):
            q, k, v = blk.qkv_heads(x, cos, sin)  # [B, H, N, hd]
            kf = k.transpose(1, 2).reshape(b, n, -1).to(k_ctx.dtype)  # [B, N, d], as the cache stores it
            vf = v.transpose(1, 2).reshape(b, n, -1).to(v_ctx.dtype)
            kk = torch.where(here, kf[:, None], k_ctx[layer])  # [B, W, N, d]
            vv = torch.where(here, vf[:, None], v_ctx[layer])
            kk = kk.reshape(b, w * n, blk.n_heads, blk.head_dim).transpose(1, 2).to(q.dtype)
            vv = vv.reshape(b, w * n, blk.n_heads, blk.head_dim).transpose(1, 2).to(q.dtype)
            x = blk.finish(x, attention(q, kk, vv, mask))
            k_out.append(kf)
            v_out.append(vf)
        logits, reward, done = dyn.heads(x.unsqueeze(1))
        return logits[:, 0], reward[:, 0], torch.sigmoid(done[:, 0]), torch.stack(k_out), torch.stack(v_out)


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
