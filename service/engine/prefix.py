"""Prefix sharing (issue 20 item 3): the candidates of one chunk whose actions so far are equal are one row.

A planner's K candidates share action prefixes (3 distinct first actions in a discrete world; a CEM iteration
concentrates its samples around its elites). Within a chunk (scheduler.Chunk: slot i is candidate k0 + i's reserved
slot) the candidates are partitioned into groups with identical actions so far; `Chunk.share` maps each group's
owner (an index into the chunk) to its members (owner included, ascending). Only the owner's slot is stepped; the
step's outputs (reward, done, tokens, frame, confidence) go out for every member. At a frame boundary each group is
split by its members' actions at this step (a node of the radix tree over the K action sequences): a branch that
does not hold the owner gets its first member as new owner, and the owner's slot is forked into it (model.fork: the
KV window / frame history copied) before the step. Members keep their reserved slots (admission and slot accounting
are unchanged: this saves compute, not memory). Once every group is a single candidate, `share` becomes None and the
chunk runs as before, with no per-step cost.

Exact: a row's result depends only on its slot's state, its action and its randomness (batch invariance,
docs/benchmarks-runtime.md), so sharing is on only where the randomness does not depend on the candidate:
  - greedy rollouts (temperature 0) of token models: argmax, MaskGIT's choice noise is scaled by the temperature;
  - `common_random_numbers`: a row's stream at step t is keyed by (seed, a hash of its actions up to and including
    step t) instead of (seed + candidate): candidates with the same prefix draw the same noise (less noisy
    comparisons for a planner), whatever the model (latent models too), and sharing is exact.
Sessions are never shared (one candidate, actions not known in advance).

Preemption gives back the chunk's last candidates (scheduler.py); an owner given back first swaps its reserved slot
with a surviving member's, so the state moves with the group without a copy (even mid-frame: the within-frame
buffers are per physical slot). Stop at done ends a whole group at once (its members share `done`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..messages import RolloutRequest
from ..model.sampling import is_sampled
from .scheduler import Chunk, Row

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_MASK63 = (1 << 63) - 1


def shareable(req: RolloutRequest, latent_out: bool) -> bool:
    """Whether a request's candidates with equal prefixes give bit-equal rows (see the module docstring)."""
    if req.session or req.candidates < 2:
        return False
    return bool(req.common_random_numbers) or not is_sampled(req.temperature, latent_out)


def start(c: Chunk, share: bool, latent_out: bool) -> None:
    """A chunk just admitted (its slots all forked from one prefill): its request's common-random-number keys (once),
    and, where sharing is exact and `share` (the engine's switch) is on, every candidate in one group."""
    req = c.req
    if req.common_random_numbers and not req.session and c.job.crn is None:
        c.job.crn = crn_keys(req)
    c.share = {0: list(range(len(c.slots)))} if share and len(c.slots) > 1 and shareable(req, latent_out) else None


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer on uint64 [..] (wrapping arithmetic)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def action_codes(actions: np.ndarray) -> np.ndarray:
    """discrete int [K, T] | continuous float [K, T, A] -> uint64 [K, T]: one code per action (continuous: a hash of
    its float32 bit patterns; -0.0 and 0.0 differ, which only ever shares less)."""
    if actions.ndim == 2:
        return actions.astype(np.int64).view(np.uint64)
    bits = np.ascontiguousarray(actions, dtype=np.float32).view(np.uint32).astype(np.uint64)  # [K, T, A]
    h = np.full(actions.shape[:2], 0x243F6A8885A308D3, np.uint64)
    for a in range(bits.shape[2]):
        h = _mix64(h ^ bits[:, :, a])
    return h


def crn_keys(req: RolloutRequest) -> np.ndarray:
    """Common random numbers: the stream key of candidate k at step t, int64 [K, T] in [0, 2^63): a hash of (seed,
    actions[k, :t + 1]). Equal prefixes -> equal keys -> equal noise (tokens, MaskGIT passes, latent noise)."""
    codes = action_codes(req.actions)  # uint64 [K, T]
    h = np.full(codes.shape[0], np.uint64(req.seed & 0xFFFFFFFFFFFFFFFF), np.uint64)
    h = _mix64(h ^ np.uint64(0x9E3779B97F4A7C15))
    out = np.empty(codes.shape, np.uint64)
    for t in range(codes.shape[1]):
        h = _mix64(h ^ _mix64(codes[:, t] + np.uint64(t + 1)))
        out[:, t] = h
    return (out & np.uint64(_MASK63)).astype(np.int64)


def split(c: Chunk, acts: list) -> tuple[list[tuple[int, list[int]]], dict[int, list[int]]]:
    """Frame boundary of chunk c: acts[i] is slot i's action at this step (int | float32 [A]). Splits every group by
    action -> (the groups in the chunk's candidate order as (owner, members), forks {src owner: [new owners]}).
    Updates c.share; sets it to None once every group is one candidate."""
    share: dict[int, list[int]] = {}
    forks: dict[int, list[int]] = {}
    for owner, members in c.share.items():
        if len(members) == 1:
            share[owner] = members
            continue
        branches: dict = {}
        for m in members:
            a = acts[m]
            branches.setdefault(a if isinstance(a, int) else a.tobytes(), []).append(m)
        if len(branches) == 1:
            share[owner] = members
            continue
        for b in branches.values():
            if owner in b:
                share[owner] = b
            else:
                share[b[0]] = b
                forks.setdefault(owner, []).append(b[0])
    groups = sorted(share.items())
    c.share = None if all(len(m) == 1 for _, m in groups) else dict(groups)
    return groups, forks


def rows(c: Chunk, model, state) -> list[Row]:
    """Chunk c's rows this step, one per group. At a frame boundary the groups split by this step's actions first
    and each new branch's owner is forked from the owner it leaves (before the step: the state is still step t's)."""
    if c.passes_done:  # a frame in progress: its next pass, no new action
        return [Row(c, c.k0 + o, c.slots[o], None, False, m[1:] or None) for o, m in sorted(c.share.items())]
    acts = c.req.actions[c.k0 : c.k0 + len(c.slots), c.step]  # int per row | float32 [A] per row
    acts = acts.tolist() if acts.ndim == 1 else list(acts)
    groups, forks = split(c, acts)
    device = model.device
    for src, dst in forks.items():  # dst int64 [D] slots: a host -> device copy without a wait
        d = torch.tensor([c.slots[i] for i in dst], dtype=torch.int64)
        model.fork(state, c.slots[src], d.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else d)
    return [Row(c, c.k0 + o, c.slots[o], acts[o], True, m[1:] or None) for o, m in groups]


def give_back(c: Chunk, victims: list[int]) -> None:
    """Preemption is about to free the reserved slots of chunk indices `victims`: an owner among them hands its slot
    (the group's state) to its first surviving member, which takes the victim's reserved slot in exchange."""
    if c.share is None:
        return
    gone = set(victims)
    share: dict[int, list[int]] = {}
    for owner, members in c.share.items():
        left = [m for m in members if m not in gone]
        if not left:
            continue
        if owner in gone:  # the state lives in the owner's physical slot: swap it to the new owner
            new = left[0]
            c.slots[owner], c.slots[new] = c.slots[new], c.slots[owner]
            owner = new
        share[owner] = left
    c.share = share if any(len(m) > 1 for m in share.values()) else None


def drop(c: Chunk, owner: int) -> None:
    """A group's world ended (stop_on_done, all its members at once): it leaves c.share."""
    if c.share is not None:
        c.share.pop(owner, None)
        if all(len(m) == 1 for m in c.share.values()):
            c.share = None
