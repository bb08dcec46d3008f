"""Within-frame decoding in the engine: MaskGIT passes (Genie) or autoregressive passes (IRIS / GAIA-1), batched
across requests at pass granularity, for a token model whose spec says `decoding: maskgit | autoregressive`.

Each engine iteration makes ONE `model.fill` call over every row that still has tokens to fill, whatever pass each
row is at (a row on its 2nd pass and one on its 17th share the call: same shapes), then one `unmask_pass` over all
of them (model/maskgit.py, the plain-PyTorch reference the engine is checked against). Rows that start a frame this
iteration first run the trunk once (`model.begin`: the KV window gets the previous frame, the conditioning of the
next one is kept per slot) and join the same fill at pass 0. A row whose frame is complete is advanced (only the
complete frame enters the KV window) and produces its event; the others wait for the next iteration.

Per slot, preallocated (static shapes): the partial frame int64 [S, N], which tokens are known bool [S, N], the
reward and done the trunk gave for this frame [S], and the sum over the passes so far of the probabilities of the
tokens each kept [S] (the frame's confidence once divided by N: RolloutEvent.confidence), all on the device.
Randomness is counter-based, keyed by (seed + candidate, step, pass, token), so a rollout is identical alone, in any
batch and on any worker.
"""

from __future__ import annotations

import torch

from ..model.maskgit import schedule, unmask_pass


class FramePasses:
    def __init__(self, model, slots: int, device):
        spec = self.spec = model.spec
        n = spec.tokens_per_frame
        self.schedule = torch.tensor(schedule(spec.decoding, n, spec.passes, spec.tokens_per_pass, spec.schedule),
                                     dtype=torch.int64, device=device)  # [P] tokens known after each pass
        self.passes = int(self.schedule.numel())
        self.order = "raster" if spec.decoding == "autoregressive" else spec.confidence
        self.partial = torch.zeros(slots, n, dtype=torch.int64, device=device)  # int64 [S, N]
        self.known = torch.zeros(slots, n, dtype=torch.bool, device=device)  # bool [S, N]
        self.reward = torch.zeros(slots, device=device)  # float32 [S]: the trunk's, for the frame in progress
        self.done = torch.zeros(slots, device=device)
        self.kept = torch.zeros(slots, device=device)  # float32 [S]: sum of the kept tokens' probabilities so far

    def begin(self, model, state, slots: torch.Tensor, actions: torch.Tensor) -> None:
        """Rows starting a frame: the trunk's one pass (slots [B], actions [B] | [B, A])."""
        begin = getattr(model, "begin", None)  # the trunk alone; a model without it: step (its logits unused)
        reward, done = begin(state, slots, actions) if begin is not None else model.step(state, slots, actions)[1:]
        self.reward[slots] = reward.float()
        self.done[slots] = done.float()
        self.partial[slots] = 0
        self.known[slots] = False
        self.kept[slots] = 0.0

    def fill(self, model, state, slots: torch.Tensor, pass_idx: torch.Tensor, temperature: torch.Tensor,
             seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One pass for every row (slots, pass_idx, seed, step int64 [B]; temperature float [B]): the one model call
        of the iteration. -> the rows' partial frames int64 [B, N] (complete where pass_idx == passes - 1)."""
        logits = model.fill(state, slots, self.partial[slots], self.known[slots])  # [B, N, V]
        zeros = torch.zeros_like(seed)
        partial, known, kept = unmask_pass(logits, self.partial[slots], self.known[slots], self.schedule[pass_idx],
                                           temperature * self.spec.decode_temperature, seed, zeros, step, pass_idx,
                                           self.order, self.spec.choice_noise)
        self.partial[slots] = partial
        self.known[slots] = known
        self.kept[slots] += kept
        return partial

    def confidence(self, slots: torch.Tensor) -> torch.Tensor:
        """Complete frames of `slots` [C]: the mean probability of their tokens, as each pass kept them -> float [C]."""
        return self.kept[slots] / self.partial.shape[1]
