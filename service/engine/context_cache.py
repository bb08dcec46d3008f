"""3b. Prefilled contexts kept across requests: the world-model counterpart of vLLM's automatic prefix caching.

A planner sends the same context (its last observations and the actions between them) with every CEM iteration of a
control tick, RL workers reset to the same start frames, many users start from one scene. Each of those requests
would encode its context frames and prefill them again: for a 4-frame context that is 3 frames of the model's work
before the first step (a quarter of a K=1, H=10 rollout). The cache keeps the state a prefill left in a slot (a KV
ring buffer, a frame history: whatever the model's `fork` copies) in slots of the engine's state reserved for it,
keyed by what a prefill reads:

    key = blake2b(tenant, context frames uint8 [C, H, W, 3] (shape and bytes), context actions (or none))

A hit forks the cached slot into the request's first slot (the protocol's `fork`: a copy) instead of encoding and
prefilling; a miss prefills as before and copies its slot into the cache, evicting the least recently used entry.
Exact: a fork copies the bits a prefill of the same context wrote (prefill is batch-invariant), so a rollout's
tokens, frames, rewards and done are bit-equal with the cache on or off (tests/unit/test_context_cache.py).

Bounded and private: `EngineSettings.context_cache_slots` slots (0: off), allocated with the engine's state at
start-up and counted by its memory check; nothing a client sends grows it. The tenant (the calling key's name) is
part of the key, so one key's requests never hit another key's entries: a hit is faster than a miss, and a shared
entry would tell a stranger which contexts another key sent.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from .. import metrics
from ..messages import RolloutRequest


def context_key(req: RolloutRequest) -> bytes:
    """What a prefill of `req` reads, hashed: its tenant, context frames and context actions."""
    h = hashlib.blake2b(digest_size=20)
    h.update(req.tenant.encode())
    h.update(b"\0")
    for a in (req.context, req.context_actions):
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.digest()


class ContextCache:
    """LRU of prefilled contexts in reserved state slots (never handed to a request)."""

    def __init__(self, slots: list[int], model: str = ""):
        self.capacity = len(slots)
        self._free = list(slots)
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, least recently used first
        self._model = model
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def lookup(self, key: bytes) -> int | None:
        """The slot holding `key`'s prefilled context (now the most recently used), or None."""
        slot = self._entries.get(key)
        if slot is None:
            self.misses += 1
            metrics.CONTEXT_CACHE.labels(self._model, "miss").inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        metrics.CONTEXT_CACHE.labels(self._model, "hit").inc()
        return slot

    def insert(self, key: bytes) -> int:
        """A slot to copy `key`'s freshly prefilled context into: a free one, else the least recently used entry's.
        The caller copies into it before the next lookup."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        slot = self._free.pop() if self._free else self._entries.popitem(last=False)[1]
        self._entries[key] = slot
        return slot

    def drop(self, key: bytes) -> None:
        """Forget `key` (its copy did not complete): its slot is free again."""
        slot = self._entries.pop(key, None)
        if slot is not None:
            self._free.append(slot)
