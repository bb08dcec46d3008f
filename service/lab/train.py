"""Train the tiny world model on collected MiniGrid episodes: tokenizer first, then dynamics.

Reproducible (seeded), checkpointed every few hundred steps and resumable (`--resume`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.config import ModelConfig
from ..model.quality import psnr
from ..model.tokenizer import nearest_code, patchify, recon_loss, to_unit
from ..model.world_model import WorldModel
from .data.collect import episodes


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + peak * 0.05


def _ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def ckpt_progress(ckpt: Path) -> tuple[int, float]:
    # (steps done, training seconds summed over resumes) recorded in a checkpoint by fit(); (0, 0.0) without one
    if not ckpt.exists():
        return 0, 0.0
    st = torch.load(ckpt, weights_only=False)
    return int(st["step"]), float(st.get("elapsed_s", 0.0))


def _resume(ckpt: Path, module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
    # -> (steps done, loss history); (0, []) without a checkpoint
    if not ckpt.exists():
        return 0, []
    st = torch.load(ckpt, weights_only=False)
    module.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    return st["step"], st["losses"]


def train_tokenizer(model: WorldModel, frames: np.ndarray, steps: int, batch: int, seed: int, ckpt: Path,
                    lr: float = 2e-3) -> list[float]:
    tok = model.tokenizer.train()
    opt = torch.optim.AdamW(tok.parameters(), lr=lr, weight_decay=0.0)
    start, losses = _resume(ckpt, tok, opt)
    gen = np.random.default_rng(seed)
    for _ in range(start):  # keep the batch stream identical on resume
        gen.integers(0, len(frames), batch)
    bar = tqdm(range(start, steps), desc="tokenizer", initial=start, total=steps, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = gen.integers(0, len(frames), batch)
        loss = recon_loss(tok, torch.from_numpy(frames[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0:
            psnr_db = psnr(float(np.mean(losses[-50:])), peak=2.0)  # range [-1, 1]
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}", psnr=f"{psnr_db:.1f}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            _ckpt(ckpt, model=tok.state_dict(), opt=opt.state_dict(), step=step + 1, losses=losses)
    tok.eval()
    return losses


def unique_patches(frames: np.ndarray, patch: int, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # uint8 [F, H, W, 3] -> distinct patches uint8 [U, p*p*3] and their counts [U] (subsampled if U is huge)
    rows = patchify(torch.from_numpy(frames), patch).reshape(-1, patch * patch * 3).numpy()
    uniq, counts = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))), return_counts=True)
    uniq = uniq.view(np.uint8).reshape(-1, rows.shape[1])
    if len(uniq) > max_rows:  # natural images: every patch is distinct, keep a random subset
        keep = np.random.default_rng(seed).choice(len(uniq), max_rows, replace=False, p=counts / counts.sum())
        uniq, counts = uniq[keep], np.ones(max_rows, np.int64)
    return uniq, counts


def fit_codebook(frames: np.ndarray, k: int, patch: int, seed: int, iters: int = 25,
                 max_rows: int = 200_000) -> tuple[torch.Tensor, dict]:
    """k-means over training patches: weighted k-means++ seeding, then Lloyd steps. -> float [K, p*p*3]."""
    uniq, counts = unique_patches(frames, patch, max_rows, seed)
    z = to_unit(torch.from_numpy(uniq), torch.float64)  # [U, D] in [-1, 1]
    w = torch.from_numpy(counts).double()
    gen = np.random.default_rng(seed)
    centres = [int(gen.choice(len(z), p=(w / w.sum()).numpy()))]
    d2 = (z - z[centres[0]]).pow(2).sum(1)
    for _ in range(1, min(k, len(z))):
        prob = (d2 * w).numpy()
        if prob.sum() <= 0:  # every distinct patch already has a code
            break
        centres.append(int(gen.choice(len(z), p=prob / prob.sum())))
        d2 = torch.minimum(d2, (z - z[centres[-1]]).pow(2).sum(1))
    c = z[centres].clone()
    for _ in range(iters):
        assign = nearest_code(z, c)
        mass = torch.zeros(len(c), dtype=torch.float64).index_add_(0, assign, w)
        sums = torch.zeros_like(c).index_add_(0, assign, z * w[:, None])
        c = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-12)[:, None], c)
    assign = nearest_code(z, c)
    if len(c) < k:  # fewer distinct patches than codes: repeat the most common one (argmin never picks a repeat)
        mass = torch.zeros(len(c), dtype=torch.float64).index_add_(0, assign, w)
        c = torch.cat([c, c[mass.argmax()].expand(k - len(c), -1)])
    mse = float(((z - c[assign]).pow(2).mean(1) * w).sum() / w.sum())
    stats = {"distinct_patches": len(uniq), "codes_used": len(assign.unique()), "patch_mse": mse}
    return c.float(), stats


def train_patch_vq(model: WorldModel, frames: np.ndarray, seed: int, ckpt: Path) -> None:
    if ckpt.exists():
        model.tokenizer.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
        return
    codebook, stats = fit_codebook(frames, model.cfg.codebook_size, model.cfg.patch, seed)
    psnr_db = psnr(stats["patch_mse"], peak=2.0)
    print(f"tokenizer: {stats['distinct_patches']} distinct patches -> {stats['codes_used']} codes, "
          f"recon {psnr_db:.1f} dB on training patches")
    with torch.no_grad():
        model.tokenizer.codebook.copy_(codebook)
    _ckpt(ckpt, model=model.tokenizer.state_dict(), stats=stats)


@torch.no_grad()
def tokenize(model: WorldModel, frames: np.ndarray, batch: int = 1024) -> np.ndarray:
    out = [model.encode(torch.from_numpy(frames[i : i + batch])).numpy().astype(np.int16)
           for i in range(0, len(frames), batch)]
    return np.concatenate(out)  # int16 [F, N]


class Windows:
    """Training windows of T frames: tokens [T, N], actions [T], next tokens [T, N], reward [T], done [T]."""

    def __init__(self, data: dict, tokens: np.ndarray, t: int):
        self.t = t
        self.tokens, self.data = tokens, data
        self.starts = []  # (frame index, action index)
        fo, ao = data["frame_offsets"], data["action_offsets"]
        for e in range(len(fo) - 1):
            n_act = ao[e + 1] - ao[e]
            for s in range(0, n_act - t + 1):
                self.starts.append((fo[e] + s, ao[e] + s))
        self.starts = np.asarray(self.starts, np.int64)
        # oversample windows that contain a reward or a termination so the heads see events
        ev = np.zeros(len(self.starts))
        for i, (_, a) in enumerate(self.starts):
            ev[i] = data["rewards"][a : a + t].any() or data["dones"][a : a + t].any()
        self.weights = np.where(ev > 0, 3.0, 1.0)
        self.weights /= self.weights.sum()

    def batch(self, gen: np.random.Generator, b: int):
        idx = gen.choice(len(self.starts), size=b, p=self.weights)
        f0 = self.starts[idx, 0][:, None] + np.arange(self.t + 1)[None]
        a0 = self.starts[idx, 1][:, None] + np.arange(self.t)[None]
        toks = torch.from_numpy(self.tokens[f0].astype(np.int64))  # [B, T+1, N]
        return (toks[:, :-1], torch.from_numpy(self.data["actions"][a0]), toks[:, 1:],
                torch.from_numpy(self.data["rewards"][a0]), torch.from_numpy(self.data["dones"][a0].astype(np.float32)))


# tokens that differ from the previous frame carry the dynamics: weight them up. Only for a deterministic world: the
# weighted loss's optimum multiplies the odds of every change by the weight (a cell next to a ball that moves there
# with p = 0.2 is predicted at 10 * 0.2 / (10 * 0.2 + 0.8) = 0.71), so a stochastic world trains with weight 1, a
# proper scoring rule whose optimum is the world's own odds.
CHANGED_WEIGHT = 10.0
REWARD_EVENT_WEIGHT = 20.0  # rewards are rare: weight their squared error up


def dynamics_loss(model: WorldModel, cfg: ModelConfig, batch, gen: torch.Generator, action_dropout: float = 0.1,
                  changed_weight: float = CHANGED_WEIGHT):
    toks, acts, nxt, rew, done = batch  # [B,T,N] [B,T] [B,T,N] [B,T] [B,T]
    drop = torch.rand(acts.shape, generator=gen) < action_dropout
    acts = torch.where(drop, torch.full_like(acts, cfg.n_actions), acts)
    logits, r, d = model.dynamics(toks, acts)
    ce_tok = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), nxt.reshape(-1), reduction="none")
    w = 1.0 + (changed_weight - 1.0) * (nxt != toks).reshape(-1).float()
    ce = (ce_tok * w).sum() / w.sum()
    rw = 1.0 + (REWARD_EVENT_WEIGHT - 1.0) * (rew > 0).float()
    r_loss = (rw * (r - rew) ** 2).mean()
    return ce + 5.0 * r_loss + 2.0 * F.binary_cross_entropy_with_logits(d, done), ce_tok.mean()


def fit(module: torch.nn.Module, batch_loss, steps: int, seed: int, ckpt: Path, lr: float, desc: str,
        weight_decay: float, betas: tuple[float, float], every: int = 100,
        time_budget_s: float | None = None, groups: list[tuple[list, float]] | None = None) -> list[float]:
    """The training loop shared by every model: AdamW, warm-up + cosine lr, clip 1.0, a checkpoint every `every`
    steps (and at a time budget), resumable with the same batch stream. batch_loss(np gen, torch gen) ->
    (loss to minimise, metric to log). groups: [(parameters, lr scale)] to train (default: all of the module's at
    lr). The checkpoint records the training seconds so far (ckpt_elapsed_s)."""
    module.train()
    groups = [(list(module.parameters()), 1.0)] if groups is None else groups
    opt = torch.optim.AdamW([{"params": list(ps), "lr_scale": scale} for ps, scale in groups], lr=lr,
                            weight_decay=weight_decay, betas=betas)
    elapsed0 = ckpt_progress(ckpt)[1]
    start, losses = _resume(ckpt, module, opt)
    gen = np.random.default_rng(seed + start)
    tgen = torch.Generator().manual_seed(seed + start)
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr) * g["lr_scale"]
        loss, metric = batch_loss(gen, tgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        losses.append(float(metric))
        if step % 20 == 0:
            bar.set_postfix(metric=f"{np.mean(losses[-20:]):.4f}", loss=f"{float(loss):.4f}")
        stop = time_budget_s is not None and time.time() - t0 > time_budget_s
        if (step + 1) % every == 0 or step + 1 == steps or stop:
            _ckpt(ckpt, model=module.state_dict(), opt=opt.state_dict(), step=step + 1, losses=losses,
                  elapsed_s=elapsed0 + time.time() - t0)
        if stop:
            break
    module.eval()
    return losses


def train_dynamics(model: WorldModel, windows: Windows, steps: int, batch: int, seed: int, ckpt: Path,
                   lr: float = 1e-3, time_budget_s: float | None = None,
                   changed_weight: float = CHANGED_WEIGHT) -> list[float]:
    def batch_loss(g, tg):
        return dynamics_loss(model, model.cfg, windows.batch(g, batch), tg, changed_weight=changed_weight)

    return fit(model.dynamics, batch_loss, steps, seed, ckpt, lr, "dynamics", 0.05, (0.9, 0.95), 100, time_budget_s)


def run(data: dict, out_ckpt_dir: Path, cfg: ModelConfig, tok_steps: int, dyn_steps: int, batch: int,
        seed: int = 0, time_budget_s: float | None = None, changed_weight: float = CHANGED_WEIGHT,
        init: WorldModel | None = None, lr: float = 1e-3) -> WorldModel:
    """Tokenizer, then dynamics; or, from `init` (a trained model), its tokenizer and a further dynamics stage
    (a fine-tune, e.g. with another changed_weight)."""
    torch.manual_seed(seed)
    model = init if init is not None else WorldModel(cfg)
    out_ckpt_dir.mkdir(parents=True, exist_ok=True)
    if init is None:  # a fine-tune keeps the model's tokenizer
        if cfg.tokenizer == "vq":
            train_patch_vq(model, data["frames"], seed, out_ckpt_dir / "tokenizer.pt")
        else:
            train_tokenizer(model, data["frames"], tok_steps, 64, seed, out_ckpt_dir / "tokenizer.pt")
    tokens = tokenize(model, data["frames"])
    windows = Windows(data, tokens, cfg.window)
    print(f"{len(windows.starts)} training windows, {len(data['frames'])} frames")
    train_dynamics(model, windows, dyn_steps, batch, seed, out_ckpt_dir / "dynamics.pt", lr, time_budget_s,
                   changed_weight)
    return model.eval()


__all__ = ["run", "episodes"]
