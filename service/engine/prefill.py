"""3b. Admission's model work: encode the admitted requests' context frames, prefill their first slots, fork the
candidates (engine.py `_admit` decides who is admitted; this runs the model for them)."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.batch import run_fixed_chunks
from .inputs import context_actions, to_device
from .scheduler import Chunk


def prefill(model, state, admitted: list[Chunk], device: torch.device, chunk: int) -> None:
    """3b. Encode every context frame of every admitted request in one batch, prefill per context length in one
    batch, fork each request's cache into its other candidates' slots. Every host array goes to the device in
    one copy (inputs.to_device): the frames, the first slots, the context actions, the fork targets."""
    groups: dict[int, list[int]] = {}  # context length -> indices of `admitted`
    for i, a in enumerate(admitted):
        groups.setdefault(a.req.context.shape[0], []).append(i)
    arrays = {"ctx": np.concatenate([a.req.context for a in admitted])}  # uint8 [sum(C), H, W, 3]
    for c, idx in groups.items():
        arrays[f"first{c}"] = np.array([admitted[i].slots[0] for i in idx], np.int64)
        acts, known = context_actions(model, [admitted[i].req for i in idx], c - 1)
        arrays[f"acts{c}"] = acts
        if known is not None:
            arrays[f"known{c}"] = known
    forked = [a for a in admitted if a.share is None]  # a shared chunk forks where its candidates diverge
    arrays["fork"] = np.array([s for a in forked for s in a.slots[1:]], np.int64)
    d = to_device(arrays, device)
    tokens = run_fixed_chunks(model.encode, d["ctx"], chunk)  # int64 [sum(C), N], batch-invariant
    off = np.cumsum([0] + [a.req.context.shape[0] for a in admitted]).tolist()
    for c, idx in groups.items():
        ctx_tokens = torch.stack([tokens[off[i] : off[i] + c] for i in idx])  # int64 [G, C, N]
        model.prefill(state, d[f"first{c}"], ctx_tokens, d[f"acts{c}"], d.get(f"known{c}"))
    f = 0
    for a in forked:  # fork: prefill once, copy into the other K-1 slots
        k = len(a.slots) - 1
        if k:
            model.fork(state, a.slots[0], d["fork"][f : f + k])
            f += k
