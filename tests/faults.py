"""Fault injection for engine tests: a real model wrapped so that its step raises on a marked request.

A request is marked by its last context frame: a frame painted POISON_RGB all over. After prefill (and fork) a
slot's `last_tokens` in the cache are that frame's tokens, so `step` raises when any slot of the batch holds them
(as a bad tensor, a kernel fault or an OOM on one request's input would). Every other call goes to the real model
unchanged, so the unmarked requests in the same batch must come out exactly as they would alone.
"""

from __future__ import annotations

import numpy as np
import torch

POISON_RGB = (255, 0, 255)


def poison_frame(h: int = 64, w: int = 64) -> np.ndarray:
    return np.broadcast_to(np.asarray(POISON_RGB, np.uint8), (h, w, 3)).copy()  # uint8 [H, W, 3]


class PoisonedModel:
    """Engine-facing wrapper of a WorldModel; `always=True` makes every step raise (an engine that cannot go on)."""

    def __init__(self, model, always: bool = False):
        self.model, self.always = model, always
        self.spec = model.spec
        frame = torch.from_numpy(poison_frame(self.spec.height, self.spec.width))[None]
        self.poison_tokens = model.encode(frame)[0]  # int64 [N]
        self.calls = 0

    @property
    def device(self):
        return self.model.device

    def allocate_state(self, slots: int):
        return self.model.allocate_state(slots)

    def fork(self, state, src, dst):
        self.model.fork(state, src, dst)

    def advance(self, state, slots, tokens):
        self.model.advance(state, slots, tokens)

    def unknown_actions(self, batch: int, count: int, device=None):
        return self.model.unknown_actions(batch, count, device)

    def encode(self, frames):
        return self.model.encode(frames)

    def decode(self, tokens):
        return self.model.decode(tokens)

    def prefill(self, cache, slots, tokens, actions, known=None):
        return self.model.prefill(cache, slots, tokens, actions, known)

    def step(self, cache, slots, actions, *, noise=None):
        self.calls += 1
        poisoned = (cache.last_tokens[slots] == self.poison_tokens).all(-1)  # bool [B]
        if self.always or bool(poisoned.any()):
            raise RuntimeError("injected fault: this batch holds a poisoned request")
        return self.model.step(cache, slots, actions)
