"""The world model as the service sees it: spec + encode / prefill / step / decode.

    encode(frames)   uint8 [B, H, W, 3]           -> int64 [B, N]
    prefill(...)     context tokens [B, C, N] (+ C-1 actions) into cache slots
    step(...)        actions for B slots          -> logits [B, N, V], reward [B], done_prob [B]
    decode(tokens)   int64 [B, N]                 -> uint8 [B, H, W, 3]

A model with a frame head (cfg.decoding "maskgit" | "autoregressive", model/maskgit.py) also has
    fill(state, slots, partial [B, N], known [B, N] bool) -> logits [B, N, V]   one pass of the head
    begin(state, slots, actions)                          -> reward [B], done_prob [B]: the trunk alone
`begin` runs the trunk once and keeps each slot's conditioning in the state; `step` = begin + the logits of pass 0
(fill with nothing known). The frame is decoded by fill + maskgit.unmask_pass passes, then `advance` as for every
model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import ModelConfig
from .dynamics import Dynamics, KVCache, advance
from .maskgit import DecodeState, FrameHead
from .memory import check_state_fits
from .protocol import ModelSpec, Noise
from .sampling import rowwise_sigmoid
from .tokenizer import make_tokenizer

log = logging.getLogger("worldserve.model")


def spec_from_config(cfg: ModelConfig) -> ModelSpec:
    return ModelSpec(cfg.name, cfg.height, cfg.width, cfg.tokens_per_frame, cfg.vocab_size, cfg.n_actions,
                     cfg.action_dim, cfg.action_names, cfg.window, cfg.max_horizon, output="logits",
                     decoding=cfg.decoding, passes=cfg.passes, decode_temperature=cfg.decode_temperature,
                     tokens_per_pass=cfg.tokens_per_pass, choice_noise=cfg.choice_noise, schedule=cfg.schedule,
                     confidence=cfg.confidence)


class WorldModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = make_tokenizer(cfg)
        self.dynamics = Dynamics(cfg)
        # the within-frame decoding head (None: a parallel model, whose weights and outputs are unchanged)
        self.frame_head = FrameHead(cfg) if cfg.has_frame_head else None

    # ---- the world-model protocol (worldserve.model.protocol): the engine's view ----------------
    @property
    def spec(self) -> ModelSpec:
        return spec_from_config(self.cfg)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def allocate_state(self, slots: int) -> KVCache:
        """The serving state (the engine's, at start-up): checked against the device's free memory and logged
        before anything is allocated (memory.py: DoesNotFit names the sizes and the slots that would fit)."""
        p = next(self.parameters())
        log.info(check_state_fits(self.cfg, slots, p.device, p.dtype))
        return self.allocate_cache(slots)

    def fork(self, cache: KVCache, src: int, dst: torch.Tensor) -> None:
        cache.fork(src, dst)

    def advance(self, cache: KVCache, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        advance(cache, slots, tokens)  # int64 [B, N] become the input of the next step

    def allocate_cache(self, slots: int, device=None, dtype=None) -> KVCache:
        # a DecodeState (the KV cache + each slot's conditioning [S, N, d]) for a model with a frame head
        p = next(self.parameters())
        cls = DecodeState if self.frame_head is not None else KVCache
        return cls.allocate(self.cfg, slots, device or p.device, dtype or p.dtype)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(frames)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(tokens)

    def prefill(self, cache, slots, tokens, actions, known=None):
        return self.dynamics.prefill(cache, slots, tokens, actions, known)

    @torch.no_grad()
    def step(self, cache, slots, actions, known=None, *, noise: Noise | None = None):
        # a token model: logits [B, N, V] for the engine to sample (noise unused)
        if self.frame_head is None:
            logits, reward, done_logit = self.dynamics.step(cache, slots, actions, known)
            return logits, reward, rowwise_sigmoid(done_logit)  # done [B]: a row's bits in any batch
        reward, done = self.begin(cache, slots, actions, known)
        nothing = torch.zeros(slots.shape[0], self.cfg.tokens_per_frame, dtype=torch.int64, device=reward.device)
        return self.fill(cache, slots, nothing, nothing.bool()), reward, done

    @torch.no_grad()
    def begin(self, state: DecodeState, slots: torch.Tensor, actions, known=None):
        """The trunk's one pass of a frame for a model with a frame head: -> reward [B], done_prob [B]; the KV window
        takes the slots' newest frame and each slot's conditioning h [B, N, d] is kept in the state for the frame's
        fill passes (engine/frames.py). `step` = begin + fill with nothing known (pass 0's logits)."""
        _, reward, done_logit, h = self.dynamics.step(state, slots, actions, known, return_hidden=True)
        state.cond[slots] = h.to(state.cond.dtype)
        return reward, rowwise_sigmoid(done_logit)

    @torch.no_grad()
    def fill(self, state: DecodeState, slots: torch.Tensor, partial: torch.Tensor, known: torch.Tensor):
        """One pass of the frame head: partial int64 [B, N] (read where known), known bool [B, N] -> logits [B, N, V].

        Rows may be at any pass of their frames; each reads its slot's conditioning, written by the last `step`.
        """
        h = state.cond[slots]  # [B, N, d]
        return self.head_logits(h, torch.where(known, partial, self.frame_head.mask_id))

    def head_logits(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # h [B, N, d] (the trunk's conditioning), tokens int64 [B, N] in [0, V] (V: unknown) -> logits [B, N, V]
        base = self.dynamics.head(self.dynamics.ln_f(h))  # the trunk's own logits of the frame
        return self.frame_head(h, tokens, base)

    def unknown_actions(self, batch: int, count: int, device=None):
        """Actions for context frames whose actions the client did not send."""
        device = device or next(self.parameters()).device
        if self.cfg.continuous:
            a = torch.zeros(batch, count, self.cfg.action_dim, device=device)
            return a, torch.zeros(batch, count, dtype=torch.bool, device=device)
        return torch.full((batch, count), self.cfg.n_actions, dtype=torch.int64, device=device), None

    def param_counts(self) -> dict[str, int]:
        counts = {
            "tokenizer": sum(p.numel() for p in self.tokenizer.parameters()),
            "dynamics": sum(p.numel() for p in self.dynamics.parameters()),
        }
        if self.frame_head is not None:
            counts["frame_head"] = sum(p.numel() for p in self.frame_head.parameters())
        return counts

    def flops_per_frame(self) -> dict[str, float]:
        """Forward FLOPs to produce one frame (multiply-add = 2), KV cache full (W frames)."""
        c = self.cfg
        n, d, w = c.tokens_per_frame, c.d_model, c.window
        per_layer = 2 * n * (4 * d * d + 2 * c.mlp_ratio * d * d) + 2 * 2 * n * (w * n) * d
        dyn = c.n_layers * per_layer + 2 * n * d * c.vocab_size + 2 * n * 9 * d * d  # + the 3x3 neighbourhood
        head = {}
        if c.has_frame_head:  # one pass of the frame head (fill): a step runs pass 0, decoding runs the rest
            dh = c.head_d_model
            per_head_layer = 2 * n * (4 * dh * dh + 2 * c.mlp_ratio * dh * dh) + 2 * 2 * n * n * dh
            head = {"head_pass": float(c.head_layers * per_head_layer + 2 * n * (25 * dh // 4 * dh + c.d_model * dh)
                                       + 2 * n * (dh + c.d_model) * c.vocab_size)}
        if c.tokenizer == "vq":  # distances to every code; decoding is a gather
            return {"dynamics_step": float(dyn), "decode": 0.0, "encode": float(2 * n * c.vocab_size * 3 * c.patch**2),
                    **head}
        ch, p, hw = c.tok_channels, c.patch, n
        dec = 2 * hw * (len(c.fsq_levels) * ch + 9 * ch * ch + ch * ch + ch * 3 * p * p)
        enc = 2 * hw * (3 * p * p * ch + 9 * ch * ch + ch * ch + ch * len(c.fsq_levels))
        return {"dynamics_step": float(dyn), "decode": float(dec), "encode": float(enc), **head}


def build(cfg: ModelConfig, seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(cfg).eval()
