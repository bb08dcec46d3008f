"""3b. Admission's model work: encode the admitted requests' context frames, prefill their first slots, fork the
candidates (engine.py `_admit` decides who is admitted; this runs the model for them). A context already prefilled
(engine/context_cache.py) is copied from its cached slot instead of encoded and prefilled again."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.batch import run_fixed_chunks
from .context_cache import ContextCache, context_key
from .inputs import context_actions, to_device
from .scheduler import Chunk


def prefill(model, state, admitted: list[Chunk], device: torch.device, chunk: int,
            cache: ContextCache | None = None) -> None:
    """3b. Encode every context frame of the admitted requests that need it in one batch, prefill per context length
    in one batch, fork each request's cache into its other candidates' slots. Every host array goes to the device in
    one copy (inputs.to_device): the frames, the first slots, the context actions, the fork targets.

    With a context cache: (1) a request whose context is cached forks it from there; (2) of the others, one per
    distinct context is encoded and prefilled, (3) the rest fork from it, (4) each newly prefilled context is copied
    into the cache; (5) every request forks into its other candidates' slots."""
    hits: dict[int, list[int]] = {}  # cache slot -> first slots that take a copy of its state (1)
    dups: dict[int, list[int]] = {}  # first slot prefilled here -> first slots of the same context (3)
    fresh: list[Chunk] = []  # chunks prefilled here, one per distinct context (2)
    stored: list[tuple[bytes, int, str]] = []  # (key, slot prefilled, tenant) to copy into the cache (4)
    if cache is not None and cache.enabled:
        primary: dict[bytes, int] = {}  # key -> first slot of the chunk prefilled for it in this admission
        for a in admitted:
            if a.job.context_key is None:  # once a request (its later chunks and replays reuse it)
                a.job.context_key = context_key(a.req)
            key = a.job.context_key
            if key in primary:
                dups.setdefault(primary[key], []).append(a.slots[0])
                cache.copied()
                continue
            src = cache.lookup(key)
            if src is not None:
                hits.setdefault(src, []).append(a.slots[0])
                continue
            primary[key] = a.slots[0]
            fresh.append(a)
            stored.append((key, a.slots[0], a.req.tenant))
    else:
        fresh = admitted
    try:  # a failure below leaves no entry: the slots taken for new ones are given back
        groups: dict[int, list[int]] = {}  # context length -> indices of `fresh`
        for i, a in enumerate(fresh):
            groups.setdefault(a.req.context.shape[0], []).append(i)
        arrays = {}
        if fresh:
            arrays["ctx"] = np.concatenate([a.req.context for a in fresh])  # uint8 [sum(C), H, W, 3]
        for c, idx in groups.items():
            arrays[f"first{c}"] = np.array([fresh[i].slots[0] for i in idx], np.int64)
            acts, known = context_actions(model, [fresh[i].req for i in idx], c - 1)
            arrays[f"acts{c}"] = acts
            if known is not None:
                arrays[f"known{c}"] = known
        forked = [a for a in admitted if a.share is None]  # a shared chunk forks where its candidates diverge
        arrays["fork"] = np.array([s for a in forked for s in a.slots[1:]], np.int64)
        arrays["copy"] = np.array([s for m in (hits, dups) for dst in m.values() for s in dst], np.int64)
        # a slot for each new entry: may evict an entry hit above ((1) copies it out first) or stored just before
        arrays["store"] = np.array([cache.insert(key, tenant) for key, _, tenant in stored], np.int64)
        d = to_device(arrays, device)
        n_hits = _copy(model, state, hits, d["copy"], 0)  # (1) before anything is evicted in (4)
        if fresh:
            tokens = run_fixed_chunks(model.encode, d["ctx"], chunk)  # int64 [sum(C), N], batch-invariant
            off = np.cumsum([0] + [a.req.context.shape[0] for a in fresh]).tolist()
            for c, idx in groups.items():
                ctx_tokens = torch.stack([tokens[off[i] : off[i] + c] for i in idx])  # int64 [G, C, N]
                model.prefill(state, d[f"first{c}"], ctx_tokens, d[f"acts{c}"], d.get(f"known{c}"))  # (2)
        _copy(model, state, dups, d["copy"], n_hits)  # (3)
        for i, (_, slot, _) in enumerate(stored):  # (4)
            model.fork(state, slot, d["store"][i : i + 1])
        f = 0
        for a in forked:  # (5) fork: prefill once, copy into the other K-1 slots
            k = len(a.slots) - 1
            if k:
                model.fork(state, a.slots[0], d["fork"][f : f + k])
                f += k
    except BaseException:
        for key, _, _ in stored:
            cache.drop(key)
        raise


def _copy(model, state, copies: dict[int, list[int]], dst: torch.Tensor, start: int) -> int:
    # copies: source slot -> destination slots, laid out in order in dst [start, ...) (int64 on the device);
    # -> the destinations' end in dst
    for src, slots in copies.items():
        model.fork(state, src, dst[start : start + len(slots)])
        start += len(slots)
    return start
