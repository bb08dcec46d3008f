"""3b. Prefilled contexts kept across requests: the world-model counterpart of vLLM's automatic prefix caching.

A planner sends the same context (its last observations and the actions between them) with every CEM iteration of a
control tick, RL workers reset to the same start frames, many users start from one scene. Each of those requests
would encode its context frames and prefill them again: for a 4-frame context that is 3 frames of the model's work
before the first step (a quarter of a K=1, H=10 rollout). The cache keeps the state a prefill left in a slot (a KV
ring buffer, a frame history: whatever the model's `fork` copies) in slots of the engine's state reserved for it,
keyed by what a prefill reads:

    key = blake2b(tenant, context frames uint8 [C, H, W, 3] (shape and bytes), context actions (or none))

A hit forks the cached slot into the request's first slot (the protocol's `fork`: a copy) instead of encoding and
prefilling; a miss prefills as before and copies its slot into the cache (when full, evicting as below).
Exact: a fork copies the bits a prefill of the same context wrote; on the CPU prefill is batch-invariant, so a
rollout's tokens, frames, rewards and done are bit-equal with the cache on or off (tests/unit/test_context_cache.py;
on CUDA as far as its GEMMs are batch-invariant).

Bounded and private: `EngineSettings.context_cache_slots` slots (0: off), allocated with the engine's state at
start-up; nothing a client sends grows it. The tenant (the calling key's name: keys that share a name are one
tenant, as for fair shares and cost caps) is part of the key, so one key's requests never hit another key's entries:
a hit is faster than a miss, and a shared entry would tell a stranger which contexts another key sent. Eviction is
fair between tenants (ContextCache.insert): a key sending many distinct contexts evicts its own entries first.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict

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
    """LRU of prefilled contexts in reserved state slots (never handed to a request), fair between tenants: when it is
    full, the entry evicted is the least recently used one of the tenant holding the most entries, so a key that
    sends many distinct contexts churns its own entries, not everyone's."""

    def __init__(self, slots: list[int], model: str = ""):
        self.capacity = len(slots)
        self._free = list(slots)
        self._entries: OrderedDict[bytes, tuple[int, str]] = OrderedDict()  # key -> (slot, tenant), LRU first
        self._model = model
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        metrics.CONTEXT_CACHE.labels(self._model, "hit" if hit else "miss").inc()

    def lookup(self, key: bytes) -> int | None:
        """The slot holding `key`'s prefilled context (now the most recently used), or None (counted: hit / miss)."""
        entry = self._entries.get(key)
        self._count(entry is not None)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def copied(self) -> None:
        """A request took a copy of a context prefilled in the same admission: counted as a hit (no prefill)."""
        self._count(True)

    def insert(self, key: bytes, tenant: str) -> int:
        """A slot to copy `key`'s freshly prefilled context into: a free one, else the slot of the least recently
        used entry of the tenant holding the most (ties: the inserting tenant's own first, else the least recently
        used among the tied). The caller copies into it before the next lookup."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        if self._free:
            slot = self._free.pop()
        else:  # full: counted now (capacity entries at most), not kept beside the entries
            held = Counter(t for _, t in self._entries.values())
            most = max(held.values())
            victim = tenant if held[tenant] == most else None  # None: the least recently used of the most-holding
            old = next(k for k, (_, t) in self._entries.items() if t == victim or victim is None and held[t] == most)
            slot = self._entries.pop(old)[0]
        self._entries[key] = (slot, tenant)
        return slot

    def drop(self, key: bytes) -> None:
        """Forget `key` (its copy did not complete): its slot is free again."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free.append(entry[0])
