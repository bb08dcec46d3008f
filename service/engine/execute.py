"""4. Execute one engine step's rows on the device: the model's work between the step's one host -> device copy
(engine/inputs.py) and its one device -> host copy (runtime/batch.to_host). Nothing in between reads the device from
the host, so on CUDA the step enqueues its kernels without waiting (torch.cuda.set_sync_debug_mode("error") passes;
engine/syncs.py counts what a step waits for).

    a. inputs: slots, actions, sampling keys, temperature, which rows start / complete a frame and which are decoded
    b. the model: one dynamics step (logits -> the engine samples, or the next latent) | within-frame decoding: the
       trunk for rows starting a frame, then ONE fill over every row whatever pass it is at (engine/frames.py)
    c. advance: only complete frames enter the context window
    d. confidence (token models): the mean probability of each frame's chosen tokens, on the device
    e. decode the frames asked for (a device index, fixed chunks), then ONE packed copy of everything to the host
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import metrics
from ..model.protocol import Noise
from ..model.sampling import token_confidence
from ..runtime.batch import HostOutputs, Sampler, bucket, decode_chunk, exact_batches, run_fixed_chunks, to_host
from ..settings import EngineSettings
from .frames import FramePasses
from .inputs import StepInputs, pack
from .scheduler import Row


@dataclass
class StepOutputs:
    rows: list[Row]  # the rows whose frame this step produced (within-frame decoding: those that completed it)
    host: HostOutputs  # their reward, done, confidence, tokens, frames on the host
    ends: set[int]  # rows whose candidate ends at done now (stop_on_done)
    frame_of: dict[int, int]  # row -> index of its frame in host.frames, for the frames that go out


class Executor:
    def __init__(self, model, state, cfg: EngineSettings, sampler: Sampler, pad_slot: int):
        self.model, self.state, self.cfg, self.sampler, self.pad_slot = model, state, cfg, sampler, pad_slot
        self.spec = model.spec
        self.device = model.device
        self.latent_out = self.spec.output == "latent"  # the model returns the next latent; else logits to sample
        passes = getattr(self.spec, "decoding", "parallel") != "parallel"  # within-frame decoding, batched by pass
        self.frames = FramePasses(model, cfg.max_slots + 1, self.device) if passes else None
        self.chunk = decode_chunk(self.device)  # rows per decode call (fixed: batch invariance)
        self.advanced = False  # the cache was advanced this step: a failure after it cannot be retried
        self.bucket_rows = 0  # rows the model computed, padding included (bench/prefix_sharing.py)
        self.exact = cfg.exact_batches and exact_batches(model)  # unpadded steps (eager on the CPU) or pow2 buckets

    def run(self, rows: list[Row]) -> StepOutputs | None:
        b = len(rows)
        nb = bucket(b, self.cfg.max_slots, self.exact)
        self.bucket_rows += nb
        metrics.BATCH_SIZE.labels(self.spec.name).observe(b)
        if self.frames is not None:
            return self._passes(rows, nb)
        inp = self._pack(rows, nb)  # a
        zeros = torch.zeros(nb, dtype=torch.int64, device=self.device)  # candidate keys: folded into seed
        if self.latent_out:  # b. the model draws its own noise from the rows' streams and returns the next latent
            out, reward, done = self.model.step(self.state, inp.slots, inp.actions,
                                                noise=Noise(inp.seed, zeros, inp.step))
            nxt, conf = out[:b], None
        else:  # b. logits [nb, N, V] -> the engine samples int64 [b, N]
            logits, reward, done = self.model.step(self.state, inp.slots, inp.actions)
            t = inp.temperature[:b]
            nxt = self.sampler(logits[:b], t, inp.seed[:b], zeros[:b], inp.step[:b])
            conf = token_confidence(logits[:b], nxt, t)  # d. float32 [b]
        self.model.advance(self.state, inp.slots[:b], nxt)  # c. the completed frame enters the context window
        self.advanced = True
        return self._outputs(rows, inp, nxt, reward[:b], done[:b], conf)  # e

    def _pack(self, rows: list[Row], nb: int, passes: int = 0) -> StepInputs:
        return pack(rows, nb, self.pad_slot, self.spec.action_dim, self.device, self.cfg.max_slots, passes, self.exact,
                    sampled=self.latent_out)

    def _passes(self, rows: list[Row], nb: int) -> StepOutputs | None:
        """b'. Within-frame decoding: the trunk for rows starting a frame, then ONE fill over every row at whatever
        pass it is; the rows whose frame completes are advanced, decoded and returned."""
        fp = self.frames
        inp = self._pack(rows, nb, fp.passes)  # a
        if inp.fresh_slots is not None:  # the trunk once per frame, bucketed too
            fp.begin(self.model, self.state, inp.fresh_slots, inp.fresh_actions)
        partial = fp.fill(self.model, self.state, inp.slots, inp.pass_idx, inp.temperature, inp.seed,
                          inp.step)  # int64 [nb, N]
        last = fp.passes - 1
        for c in {id(r.chunk): r.chunk for r in rows}.values():
            c.passes_done = 0 if c.passes_done == last else c.passes_done + 1
        if not inp.complete_rows:
            return None
        crows = [rows[i] for i in inp.complete_rows]
        cslots, nxt = inp.slots.index_select(0, inp.complete), partial.index_select(0, inp.complete)
        self.model.advance(self.state, cslots, nxt)  # c. only the complete frame enters the context window
        self.advanced = True
        return self._outputs(crows, inp, nxt, fp.reward[cslots], fp.done[cslots], fp.confidence(cslots))

    def _outputs(self, rows: list[Row], inp: StepInputs, nxt: torch.Tensor, reward: torch.Tensor,
                 done: torch.Tensor, conf: torch.Tensor | None) -> StepOutputs:
        """e. Frames decoded where asked (one device index, fixed chunks), then the one device -> host copy."""
        frames = None
        if inp.want_rows:  # uint8 [F, H, W, 3]
            frames = run_fixed_chunks(self.model.decode, nxt.index_select(0, inp.want), self.chunk)
        tokens = nxt if inp.tokens and not self.latent_out else None
        host = to_host(reward, done, conf, tokens, frames)
        ends = {i for i, u in inp.stop_at.items() if host.done[i] > u}  # 0.5 greedy; a seeded draw when sampled
        frame_of = {i: j for j, i in enumerate(inp.want_rows) if i not in inp.if_end or i in ends}
        return StepOutputs(rows, host, ends, frame_of)
