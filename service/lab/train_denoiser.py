"""Train the continuous-latent denoising world model (worldserve.model.denoiser) on collected MiniGrid episodes.

Stage 1, autoencoder: per-patch MLP on the distinct training patches (count-weighted, so the rare agent headings
are learned), until every training patch reconstructs exactly in uint8.
Stage 2, denoiser: EDM loss on (last K frame latents, action) -> next frame latent, plus reward and done heads.
Seeded, checkpointed every 200 steps and resumable; `time_budget_s` stops early with a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..model.denoiser import DenoiserConfig, DenoisingWorldModel, edm_loss
from ..model.quality import psnr
from .train import _ckpt, _resume, fit, lr_at, unique_patches


def train_autoencoder(model: DenoisingWorldModel, frames: np.ndarray, steps: int, seed: int, ckpt: Path,
                      batch: int = 512, lr: float = 3e-3) -> dict:
    ae = model.autoencoder.train()
    p = model.cfg.patch
    uniq, counts = unique_patches(frames, p, 200_000, seed)  # uint8 [U, p*p*3]
    x = torch.from_numpy(uniq).float().div(127.5).sub(1.0)  # [U, D] in [-1, 1]
    w = np.sqrt(counts.astype(np.float64))
    w /= w.sum()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    start, losses = _resume(ckpt, ae, opt)
    gen = np.random.default_rng(seed + start)
    for step in tqdm(range(start, steps), desc="autoencoder", initial=start, total=steps, mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        xb = x[gen.choice(len(x), batch, p=w)]
        z = torch.tanh(ae.enc(xb))
        loss = ((ae.dec(z) - xb) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if (step + 1) % 500 == 0 or step + 1 == steps:
            _ckpt(ckpt, model=ae.state_dict(), opt=opt.state_dict(), step=step + 1, losses=losses)
    ae.eval()
    with torch.no_grad():
        rec = ae.dec(torch.tanh(ae.enc(x))).add(1).mul(127.5).round().clamp(0, 255)
        exact = float((rec == torch.from_numpy(uniq).float()).all(1).float().mean())
    return {"distinct_patches": len(uniq), "exact_patches": exact, "loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def encode_all(model: DenoisingWorldModel, frames: np.ndarray, batch: int = 1024) -> torch.Tensor:
    return torch.cat([model.encode(torch.from_numpy(frames[i : i + batch])) for i in range(0, len(frames), batch)])


class Transitions:
    """(K context latents, action, next latent, reward, done) for every action of every episode."""

    def __init__(self, data: dict, latents: torch.Tensor, k: int):
        self.latents, self.k = latents, k  # [F, C, h, w]
        ctx, nxt, act = [], [], []
        fo, ao = data["frame_offsets"], data["action_offsets"]
        for e in range(len(fo) - 1):
            f0 = fo[e]
            for j in range(ao[e + 1] - ao[e]):
                ctx.append([f0 + max(0, j - k + 1 + i) for i in range(k)])  # earliest frame repeated at the start
                nxt.append(f0 + j + 1)
                act.append(ao[e] + j)
        self.ctx, self.nxt = np.asarray(ctx), np.asarray(nxt)
        a = np.asarray(act)
        self.actions = torch.from_numpy(data["actions"][a])
        self.rewards = torch.from_numpy(data["rewards"][a])
        self.dones = torch.from_numpy(data["dones"][a].astype(np.float32))
        ev = (self.rewards > 0) | (self.dones > 0)
        changed = (latents[self.nxt] - latents[self.ctx[:, -1]]).abs().amax((1, 2, 3)) > 1e-3
        self.weights = np.where(ev.numpy(), 3.0, 1.0) * np.where(changed.numpy(), 2.0, 1.0)
        self.weights /= self.weights.sum()

    def batch(self, gen: np.random.Generator, b: int):
        i = gen.choice(len(self.nxt), size=b, p=self.weights)
        ctx = self.latents[self.ctx[i]].flatten(1, 2)  # [B, K*C, h, w]
        return ctx, self.latents[self.nxt[i]], self.actions[i], self.rewards[i], self.dones[i]


def train_denoiser(model: DenoisingWorldModel, tr: Transitions, steps: int, batch: int, seed: int, ckpt: Path,
                   lr: float = 1e-3, time_budget_s: float | None = None) -> list[float]:
    return fit(model.denoiser, lambda g, tg: edm_loss(model, *tr.batch(g, batch), tg), steps, seed, ckpt, lr,
               "denoiser", 0.01, (0.9, 0.99), 200, time_budget_s)


def run(data: dict, ckpt_dir: Path, cfg: DenoiserConfig, ae_steps: int, steps: int, batch: int, seed: int = 0,
        time_budget_s: float | None = None) -> tuple[DenoisingWorldModel, dict]:
    torch.manual_seed(seed)
    model = DenoisingWorldModel(cfg)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stats = train_autoencoder(model, data["frames"], ae_steps, seed, ckpt_dir / "autoencoder.pt")
    print(f"autoencoder: {stats['distinct_patches']} distinct patches, {100 * stats['exact_patches']:.1f}% exact, "
          f"recon {psnr(stats['loss'], peak=2.0):.1f} dB")
    tr = Transitions(data, encode_all(model, data["frames"]), cfg.context)
    print(f"{len(tr.nxt)} transitions, {len(data['frames'])} frames")
    losses = train_denoiser(model, tr, steps, batch, seed, ckpt_dir / "denoiser.pt", time_budget_s=time_budget_s)
    stats["denoise_loss"] = float(np.mean(losses[-50:])) if losses else float("nan")
    stats["denoiser_steps"] = len(losses)
    return model.eval(), stats
