"""Fine-tune a trained token world model with a within-frame decoding head (model/maskgit.py): Genie's recipe,
masked-token prediction.

From a trained model (its tokenizer frozen, its trunk trained on at a low learning rate), for every frame pair of a
training window the trunk gives the conditioning h [B, T, N, d] of the next frame in one pass; a random subset of
that frame's tokens is masked (the masked fraction drawn from the cosine schedule, r = cos(pi/2 * u), u ~ U(0, 1),
at least one token) and the head predicts them from h and the tokens left visible: cross-entropy on the masked
positions, plus the trunk's reward and done losses (train.dynamics_loss's) and its own per-token loss (so step's
parallel logits stay a calibrated model too). Seeded, checkpointed, resumable (train.fit).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.dynamics import KVCache, advance
from ..model.world_model import WorldModel
from .train import REWARD_EVENT_WEIGHT, Windows, ckpt_progress, fit, tokenize


def with_head(init: WorldModel, name: str, decoding: str = "maskgit", passes: int = 8, head_layers: int = 2,
              head_d_model: int = 128, decode_temperature: float = 1.0, tokens_per_pass: int = 0,
              choice_noise: float = 1.0, schedule: str = "cosine", confidence: str = "sampled",
              seed: int = 0) -> WorldModel:
    """A model with `init`'s tokenizer and trunk (weights copied) and a new frame head (its output layer at zero:
    it starts as `init`'s parallel model)."""
    cfg = dataclasses.replace(init.cfg, name=name, decoding=decoding, passes=passes, head_layers=head_layers,
                              head_d_model=head_d_model, decode_temperature=decode_temperature,
                              tokens_per_pass=tokens_per_pass, choice_noise=choice_noise, schedule=schedule,
                              confidence=confidence)
    torch.manual_seed(seed)
    model = WorldModel(cfg)
    missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("frame_head.") for k in missing), (missing, unexpected)
    return model.eval()


def mask_tokens(n_frames: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """-> bool [F, N]: per frame a uniformly random subset of ceil(N * cos(pi/2 * u)) positions, u ~ U(0, 1), >= 1."""
    u = torch.rand(n_frames, generator=gen)
    n_mask = torch.ceil(n * torch.cos(math.pi / 2 * u)).clamp(1, n).long()  # [F]
    rank = torch.rand(n_frames, n, generator=gen).argsort(-1).argsort(-1)  # a random permutation per frame
    return rank < n_mask[:, None]


def maskgit_loss(model: WorldModel, batch, gen: torch.Generator, action_dropout: float = 0.1,
                 trunk_weight: float = 0.5, uncertain_weight: float = 0.0):
    """-> (loss, masked-token cross-entropy). batch: tokens [B, T, N], actions [B, T], next [B, T, N], reward, done."""
    cfg = model.cfg
    toks, acts, nxt, rew, done = batch
    drop = torch.rand(acts.shape, generator=gen) < action_dropout
    acts = torch.where(drop, torch.full_like(acts, cfg.n_actions), acts)
    logits, r, d, h = model.dynamics(toks, acts, return_hidden=True)  # h [B, T, N, d]: one trunk pass per window
    b, t, n = nxt.shape
    target = nxt.reshape(b * t, n)
    masked = mask_tokens(b * t, n, gen)  # [B*T, N]
    inp = torch.where(masked, torch.full_like(target, model.frame_head.mask_id), target)
    head_logits = model.head_logits(h.reshape(b * t, n, -1), inp)  # [B*T, N, V]
    w = 1.0 + uncertain_weight * (1.0 - logits.detach().reshape(b * t, n, -1).softmax(-1).amax(-1))  # see below
    ce = (F.cross_entropy(head_logits[masked], target[masked], reduction="none") * w[masked]).sum() / w[masked].sum()
    trunk_ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), nxt.reshape(-1))
    rw = 1.0 + (REWARD_EVENT_WEIGHT - 1.0) * (rew > 0).float()
    r_loss = (rw * (r - rew) ** 2).mean()
    loss = ce + trunk_weight * trunk_ce + 5.0 * r_loss + 2.0 * F.binary_cross_entropy_with_logits(d, done)
    return loss, ce.detach()


@torch.no_grad()
def conditioning(model: WorldModel, data: dict, tokens: np.ndarray, episodes: int = 256) -> torch.Tensor:
    """The trunk's conditioning of every next frame of the data, computed as serving computes it (cached steps with
    the true frames fed back, up to W frames of context): float16 [A, N, d], row a = the frame after action a."""
    fo, ao, cfg = data["frame_offsets"], data["action_offsets"], model.cfg
    out = torch.empty(int(ao[-1]), cfg.tokens_per_frame, cfg.d_model, dtype=torch.float16)
    tok = torch.from_numpy(tokens.astype(np.int64))  # [F, N]
    acts = torch.from_numpy(data["actions"])
    for e0 in range(0, len(fo) - 1, episodes):
        eps = np.arange(e0, min(e0 + episodes, len(fo) - 1))
        lens = ao[eps + 1] - ao[eps]  # actions per episode
        cache = KVCache.allocate(cfg, len(eps))
        slots = torch.arange(len(eps))
        model.dynamics.prefill(cache, slots, tok[fo[eps]][:, None], acts[:0].view(len(eps), 0).expand(len(eps), 0))
        for t in range(int(lens.max())):
            live = np.nonzero(lens > t)[0]
            a_idx, f_next = torch.from_numpy(ao[eps[live]] + t), torch.from_numpy(fo[eps[live]] + t + 1)
            *_, h = model.dynamics.step(cache, slots[live], acts[a_idx], return_hidden=True)
            out[a_idx] = h.half()
            advance(cache, slots[live], tok[f_next])
    return out


def cached_head_loss(model: WorldModel, cond: torch.Tensor, nxt: torch.Tensor, gen: torch.Generator,
                     uncertain_weight: float = 0.0):
    """The frozen trunk's path: cond float16 [B, N, d] (from `conditioning`), nxt int64 [B, N] -> (loss, masked CE).

    uncertain_weight: each masked position's cross-entropy weighs 1 + uncertain_weight * (1 - the trunk's top
    probability there), so the few positions the past leaves open (where a ball may go) dominate the loss. The weight
    depends on the input only, so every position's optimum is still the true conditional (a proper scoring rule)."""
    b, n = nxt.shape
    masked = mask_tokens(b, n, gen)
    inp = torch.where(masked, torch.full_like(nxt, model.frame_head.mask_id), nxt)
    with torch.no_grad():
        h = cond.float()
        base = model.dynamics.head(model.dynamics.ln_f(h))  # the trunk's own logits
        w = 1.0 + uncertain_weight * (1.0 - base.softmax(-1).amax(-1))  # [B, N]
    ce = F.cross_entropy(model.frame_head(h, inp, base)[masked], nxt[masked], reduction="none")
    return (ce * w[masked]).sum() / w[masked].sum(), ce.mean().detach()


def run(data: dict, ckpt_dir: Path, init: WorldModel, steps: int, batch: int, seed: int = 0, lr: float = 1e-3,
        trunk_lr_scale: float = 0.1, time_budget_s: float | None = None, name: str = "maskgit",
        uncertain_weight: float = 0.0, **head) -> WorldModel:
    """Fine-tune `init` with a frame head (`head`: with_head's decoding, passes, head_layers, head_d_model, ...):
    the head at `lr`, the tokenizer frozen. Resumes from ckpt_dir/maskgit.pt.

    trunk_lr_scale > 0: end to end on training windows of W frames (`batch` windows a step), the trunk at
    lr * trunk_lr_scale, with its per-token, reward and done losses. trunk_lr_scale == 0: the trunk frozen; its
    conditioning of every frame is computed once (`conditioning`, as served) and each step trains the head alone on
    `batch` * W frame pairs (the same frames a step as end to end, at a fraction of the CPU time). Both weight the
    masked positions by uncertain_weight (cached_head_loss)."""
    model = with_head(init, name, seed=seed, **head)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokenize(model, data["frames"])
    model.tokenizer.requires_grad_(False)
    groups = [(list(model.frame_head.parameters()), 1.0)]
    if trunk_lr_scale > 0:
        groups.append((list(model.dynamics.parameters()), trunk_lr_scale))
        windows = Windows(data, tokens, model.cfg.window)
        print(f"{len(windows.starts)} training windows, {len(data['frames'])} frames")

        def batch_loss(g, tg):
            return maskgit_loss(model, windows.batch(g, batch), tg, uncertain_weight=uncertain_weight)
    else:
        model.dynamics.requires_grad_(False)
        t0 = time.time()
        cache = ckpt_dir / "conditioning.pt"  # kept for a resume (the trunk is frozen: it never changes)
        if cache.exists():
            cond = torch.load(cache)["cond"]
        else:
            cond = conditioning(model.eval(), data, tokens)  # float16 [A, N, d]
            torch.save({"cond": cond, "seconds": time.time() - t0}, cache.with_suffix(".tmp"))
            cache.with_suffix(".tmp").replace(cache)
        # the frame after action a: frame offsets + (action index - action offset of its episode) + 1
        ep = np.searchsorted(data["action_offsets"], np.arange(len(cond)), side="right") - 1
        nxt = torch.from_numpy(tokens[data["frame_offsets"][ep] + np.arange(len(cond)) - data["action_offsets"][ep]
                                      + 1].astype(np.int64))  # [A, N]
        print(f"conditioning of {len(cond)} frame pairs ({time.time() - t0:.0f} s)")

        def batch_loss(g, tg):
            idx = torch.from_numpy(g.integers(0, len(cond), batch * model.cfg.window))
            return cached_head_loss(model, cond[idx], nxt[idx], tg, uncertain_weight)

    if time_budget_s is not None:  # the budget covers every stage and every resume
        time_budget_s = max(0.0, time_budget_s - training_seconds(ckpt_dir))
    fit(model, batch_loss, steps, seed, ckpt_dir / "maskgit.pt", lr, "maskgit", 0.05, (0.9, 0.95), 100,
        time_budget_s, groups)
    return model.eval()


def training_seconds(ckpt_dir: Path) -> float:
    """CPU-clock seconds spent so far: the frozen trunk's conditioning (if computed) + fit's steps, over resumes."""
    cond = ckpt_dir / "conditioning.pt"
    pre = float(torch.load(cond)["seconds"]) if cond.exists() else 0.0
    return pre + ckpt_progress(ckpt_dir / "maskgit.pt")[1]
