"""4a. A step's inputs: every per-row value packed on the host into ONE buffer (pinned on CUDA), copied to the device
ONCE with `non_blocking`, and read there as views. No Python list ever indexes a device tensor (that is a copy and a
wait each time): which rows start a frame, complete one or want their frame decoded are index tensors in the same
buffer.

    slots        int64 [nb]       the rows' slots; padding rows (up to the bucket nb) write into the scratch slot
    actions      int64 [nb] | float32 [nb, A]   padding rows: 0
    seed         int64 [nb]       (request seed + candidate) mod 2^63: candidate k of a request seeded s draws from
                                  stream s + k, so a fork equals K requests seeded s .. s+K-1, alone or in any batch;
                                  common_random_numbers: a hash of (seed, the candidate's actions up to this step)
    step         int64 [nb]       the frame's index in its rollout
    temperature  float32 [nb]     >= 0 (0: greedy)
    want         int64 [F]        rows (of the frames this step completes) whose frame is decoded, in order
  within-frame decoding (engine/frames.py) only:
    pass_idx     int64 [nb]       each row's pass of its frame
    fresh_slots  int64 [nf]       rows starting a frame (their trunk pass), bucketed, padded with the scratch slot
    fresh_actions                 their actions, [nf] | [nf, A]
    complete     int64 [C]        rows whose frame completes this iteration
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..messages import FrameMode
from ..model.sampling import done_thresholds, is_sampled
from ..runtime.batch import bucket
from .scheduler import Chunk, Row

_ALIGN = 8  # every array starts on an 8-byte boundary (an int64 view needs it)
_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32, np.dtype(np.uint8): torch.uint8,
           np.dtype(np.bool_): torch.bool}


def to_device(arrays: dict[str, np.ndarray], device: torch.device,
              packed: bool | None = None) -> dict[str, torch.Tensor]:
    """Host arrays (int64, float32, uint8, bool) -> device tensors of the same shapes, through one byte buffer and
    one copy (on the CPU the arrays themselves, shared: nothing to copy; packed=True packs there too, tested)."""
    cuda = device.type == "cuda"
    if not (cuda if packed is None else packed):
        return {name: torch.from_numpy(a) for name, a in arrays.items()}
    layout, off = [], 0
    for name, a in arrays.items():
        layout.append((name, a, off))
        off += -(-a.nbytes // _ALIGN) * _ALIGN
    host = torch.empty(max(off, _ALIGN), dtype=torch.uint8, pin_memory=cuda)
    hb = host.numpy()
    for _, a, o in layout:
        hb[o : o + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    dev = host.to(device, non_blocking=True) if cuda else host  # the step's one host -> device copy
    return {name: dev[o : o + a.nbytes].view(_DTYPES[a.dtype]).view(a.shape) for name, a, o in layout}


@dataclass
class StepInputs:
    b: int  # rows
    nb: int  # their bucket
    slots: torch.Tensor
    actions: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor
    temperature: torch.Tensor
    want: torch.Tensor
    want_rows: list[int]  # host copy of `want`: frame j of the step is row want_rows[j]
    if_end: set[int]  # rows decoded only in case they end at done this step (stop_on_done + frames LAST)
    stop_at: dict[int, float]  # stop_on_done rows -> the done probability above which their world ends now
    tokens: bool  # a row asked for its tokens
    pass_idx: torch.Tensor | None = None
    fresh_slots: torch.Tensor | None = None
    fresh_actions: torch.Tensor | None = None
    complete: torch.Tensor | None = None
    complete_rows: list[int] | None = None  # host copy of `complete`


def wants_frame(c: Chunk) -> bool:
    """The frame of chunk c's current step goes to the client (not a replayed step; frames ALL, or LAST at its end)."""
    m = c.req.frames
    return c.step >= c.skip and (m == FrameMode.ALL or (m == FrameMode.LAST and (c.req.session or
                                                                                 c.step == c.req.horizon - 1)))


def spans(rows: list[Row]) -> list[tuple[Chunk, int, int]]:
    """The rows of each chunk, adjacent in a step (engine._schedule): (chunk, first row, past its last row)."""
    out: list[tuple[Chunk, int, int]] = []
    last, i0 = None, 0
    for i, r in enumerate(rows):
        if r.chunk is not last:
            if last is not None:
                out.append((last, i0, i))
            last, i0 = r.chunk, i
    if last is not None:
        out.append((last, i0, len(rows)))
    return out


def outputs_wanted(rows: list[Row]) -> tuple[list[int], set[int], list[int], bool]:
    """What the step's rows want back, decided per chunk:
    want    rows whose frame is decoded: those that want it, and, decoded in case (the host learns `done` only with
            the step's one copy), stop_on_done rows with frames LAST that would want it if they ended now
    if_end  those decoded in case
    stop    rows whose candidate stops when the model says done (read from the copy)
    tokens  whether any row asked for its tokens"""
    want: list[int] = []
    if_end: set[int] = set()
    stop: list[int] = []
    tokens = False
    for c, i0, i1 in spans(rows):
        req = c.req
        tokens = tokens or req.return_tokens
        stops = req.stop_on_done and not req.session
        if stops:
            stop.extend(range(i0, i1))
        if wants_frame(c):
            want.extend(range(i0, i1))
        elif stops and req.frames == FrameMode.LAST and c.step >= c.skip:
            want.extend(range(i0, i1))
            if_end.update(range(i0, i1))
    return want, if_end, stop, tokens


def pack(rows: list[Row], nb: int, pad_slot: int, action_dim: int, device: torch.device, max_slots: int,
         passes: int = 0, exact: bool = False, sampled: bool = False) -> StepInputs:
    """The rows' inputs, padded to the bucket nb, on the device in one copy. passes: the model's passes per frame
    (within-frame decoding), 0 for a model whose step makes the frame. exact: the fresh rows unpadded too
    (runtime/batch.exact_batches). sampled: every row's future is sampled whatever its temperature (a latent model
    draws its noise always), so its world's end is drawn too."""
    b, pad = len(rows), nb - len(rows)
    sp = spans(rows)
    slots = np.array([r.slot for r in rows] + [pad_slot] * pad, np.int64)
    cand = [r.candidate for r in rows]
    seeds: list[int] = []
    step, temp = np.zeros(nb, np.int64), np.zeros(nb, np.float32)
    for c, i0, i1 in sp:
        keys = c.job.crn  # common random numbers: int64 [K, T] keyed by the action prefix (engine/prefix.py)
        if keys is None:
            base = c.req.seed
            seeds.extend((base + k) % (1 << 63) for k in cand[i0:i1])
        else:
            seeds.extend(keys[cand[i0:i1], c.step].tolist())
        step[i0:i1], temp[i0:i1] = c.step, c.req.temperature
    seed = np.array(seeds + [0] * pad, np.int64)
    if action_dim:  # float32 [nb, A]; a row without an action (a frame in progress) gets zeros
        acts = np.zeros((nb, action_dim), np.float32)
        for i, r in enumerate(rows):
            if r.action is not None:
                acts[i] = r.action
    else:  # int64 [nb]
        acts = np.array([0 if r.action is None else r.action for r in rows] + [0] * pad, np.int64)
    arrays = {"slots": slots, "actions": acts, "seed": seed, "step": step, "temperature": temp}
    complete_rows = None
    if passes:
        last = passes - 1
        pidx = np.zeros(nb, np.int64)
        for c, i0, i1 in sp:
            pidx[i0:i1] = c.passes_done
        arrays["pass_idx"] = pidx
        fresh = [i for i, r in enumerate(rows) if r.fresh]
        if fresh:
            nf = bucket(len(fresh), max_slots, exact)
            fs = np.full(nf, pad_slot, np.int64)
            fs[: len(fresh)] = slots[fresh]
            fa = np.zeros((nf, *acts.shape[1:]), acts.dtype)
            fa[: len(fresh)] = acts[fresh]
            arrays["fresh_slots"], arrays["fresh_actions"] = fs, fa
        complete_rows = [i for c, i0, i1 in sp if c.passes_done == last for i in range(i0, i1)]
        arrays["complete"] = np.array(complete_rows, np.int64)
        wanted = outputs_wanted([rows[i] for i in complete_rows])  # indices among the completing rows
        at = np.array(complete_rows, np.int64)
    else:
        wanted = outputs_wanted(rows)
        at = np.arange(b)
    want, if_end, stop, tokens = wanted
    stop_at = {}
    if stop:  # model/sampling.done_thresholds: 0.5 greedy, a draw from the row's stream when sampled
        i = at[stop]
        t = is_sampled(temp[i], sampled).astype(np.float32)  # 1: drawn, 0: greedy
        u = done_thresholds(torch.from_numpy(seed[i]), torch.from_numpy(step[i]), torch.from_numpy(t))
        stop_at = dict(zip(stop, u.tolist(), strict=True))
    arrays["want"] = np.array(want, np.int64)
    d = to_device(arrays, device)
    return StepInputs(b, nb, d["slots"], d["actions"], d["seed"], d["step"], d["temperature"], d["want"], want,
                      if_end, stop_at, tokens,
                      d.get("pass_idx"), d.get("fresh_slots"), d.get("fresh_actions"), d.get("complete"),
                      complete_rows)


def context_actions(model, reqs: list, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Admission: the first n context actions of each request on the host, [G, n] int64 | [G, n, A] float32, the
    model's "unknown" where a request sent none, and for continuous models a known mask bool [G, n] (else None)."""
    acts, known = model.unknown_actions(len(reqs), n, torch.device("cpu"))
    acts, known = acts.numpy().copy(), None if known is None else known.numpy().copy()
    for i, r in enumerate(reqs):
        if r.context_actions is not None and n > 0:
            acts[i] = np.asarray(r.context_actions[:n]).astype(acts.dtype)
            if known is not None:
                known[i] = True
    return acts, known
