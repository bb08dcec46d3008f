"""A continuous-latent world model: the next frame's latent is denoised in a few steps (DIAMOND / Oasis style).

No tokens and no engine-side sampling: `step` starts from Gaussian noise drawn from the engine's counter-based
streams (worldserve.model.protocol.Noise) and runs `denoise_steps` Euler steps of an EDM-preconditioned
denoiser conditioned on the last `context` frame latents and the action; reward and done come from a head over
(context, next latent, action). A seeded rollout is therefore reproducible alone, in any batch, on any worker.

    encode(frames)   uint8 [B, H, W, 3]                  -> float32 latents [B, C, h, w] in [-1, 1]
    prefill          latents [B, T, C, h, w] of the context into the slots' frame history
    step             actions [B] (+ noise)               -> next latent [B, C, h, w], reward [B], done prob [B]
    advance          next latents [B, C, h, w] become the newest frame of each slot's history
    decode(latents)  [B, C, h, w]                        -> uint8 [B, H, W, 3]

The autoencoder is per patch (one latent cell per patch x patch pixels, an MLP each way): MiniGrid's cells are
patches, so a cell's picture maps to a C-vector and back. The denoiser is a small residual conv net over the
latent grid: its receptive field covers the whole 8 x 8 grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_done_calibration
from .dynamics import rowwise_linear
from .protocol import ModelSpec, Noise
from .quality import psnr
from .sampling import calibrate_done, rowwise_sigmoid

ARCHITECTURE = "denoiser"
CHUNK = 8  # rows per denoiser call: CPU conv kernels pick their algorithm by batch size (batch invariance)


@dataclass(frozen=True)
class DenoiserConfig:
    name: str = "denoiser"
    architecture: str = ARCHITECTURE
    height: int = 64
    width: int = 64
    patch: int = 8  # one latent cell per patch x patch pixels
    latent_ch: int = 8  # C
    context: int = 4  # frames of history the denoiser sees
    channels: int = 64
    n_blocks: int = 4
    n_actions: int = 3
    action_names: tuple[str, ...] = ("left", "right", "forward")
    denoise_steps: int = 3
    sigma_min: float = 0.002
    sigma_max: float = 5.0
    sigma_data: float = 0.5
    max_horizon: int = 64
    # post-hoc calibration of the done head, sigmoid(done_scale * logit + done_bias) (lab/calibrate.py writes it);
    # identity by default, and then absent from config.json
    done_scale: float = 1.0
    done_bias: float = 0.0

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["action_names"] = list(self.action_names)
        if self.done_scale == 1.0 and self.done_bias == 0.0:  # uncalibrated: config.json as before
            del d["done_scale"], d["done_bias"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DenoiserConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "action_names" in d:
            d["action_names"] = tuple(d["action_names"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises ValueError naming what is out of range (a config.json is input like any other)."""
        if not (isinstance(self.denoise_steps, int) and self.denoise_steps >= 1):
            raise ValueError(f"denoise_steps must be >= 1 (an integer), got {self.denoise_steps!r}")
        check_done_calibration(self.done_scale, self.done_bias)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}")


class PatchAutoencoder(nn.Module):
    """uint8 frames <-> latent grid, one C-vector per patch."""

    def __init__(self, cfg: DenoiserConfig, hidden: int = 256):
        super().__init__()
        self.cfg = cfg
        d = 3 * cfg.patch * cfg.patch
        self.enc = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, cfg.latent_ch))
        self.dec = nn.Sequential(nn.Linear(cfg.latent_ch, hidden), nn.GELU(), nn.Linear(hidden, d))

    def patches(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> float [B, h, w, p*p*3] in [-1, 1]
        b, p = frames.shape[0], self.cfg.patch
        (h, w), dt = self.cfg.grid, self.enc[0].weight.dtype
        x = frames.to(dt).div(127.5).sub(1.0).view(b, h, p, w, p, 3)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, p * p * 3)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.enc(self.patches(frames))).permute(0, 3, 1, 2).contiguous()  # [B, C, h, w]

    def decode_unit(self, z: torch.Tensor) -> torch.Tensor:
        # [B, C, h, w] -> float [B, H, W, 3] in [-1, 1]
        b, p = z.shape[0], self.cfg.patch
        h, w = self.cfg.grid
        x = self.dec(z.permute(0, 2, 3, 1).to(self.dec[0].weight.dtype)).view(b, h, w, p, p, 3)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, 3)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_unit(z).add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # uint8 [B, H, W, 3]


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(ch, 2 * ch)  # noise level + action -> scale, shift

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, 1)
        h = self.conv1(F.gelu(self.norm1(x)))
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.gelu(h))


class Denoiser(nn.Module):
    """D(x_sigma, sigma | context latents, action) -> the clean next latent (EDM preconditioning)."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        c, ch = cfg.latent_ch, cfg.channels
        self.act_emb = nn.Embedding(cfg.n_actions, ch)
        self.sigma_emb = nn.Linear(1, ch)
        self.inp = nn.Conv2d(c * (cfg.context + 1), ch, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(ch) for _ in range(cfg.n_blocks))
        self.out = nn.Conv2d(ch, c, 3, padding=1)
        # reward / done from (context, next latent, action)
        self.head_conv = nn.Conv2d(c * (cfg.context + 1), ch, 3, padding=1)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(2 * ch, ch), nn.GELU(), nn.Linear(ch, 2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        # x [B, C, h, w] noisy; sigma [B]; ctx [B, K*C, h, w]; action int64 [B] -> D(x) [B, C, h, w]
        sd = self.cfg.sigma_data
        s = sigma.view(-1, 1, 1, 1)
        c_in, c_skip = 1 / (s**2 + sd**2).sqrt(), sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        cond = self.act_emb(action) + self.sigma_emb(sigma.log().view(-1, 1) / 4)
        h = self.inp(torch.cat([x * c_in, ctx], 1))
        for blk in self.blocks:
            h = blk(h, cond)
        return c_skip * x + c_out * self.out(F.gelu(h))

    def heads(self, ctx: torch.Tensor, nxt: torch.Tensor, action: torch.Tensor):
        # -> reward [B], done logit [B]
        h = self.head_conv(torch.cat([ctx, nxt], 1))  # [B, ch, h, w]
        feat = torch.cat([h.mean((2, 3)) + self.act_emb(action), h.amax((2, 3))], 1)  # [B, 2*ch]
        # the MLP row by row, not as GEMMs over the batch: on AMX CPUs a GEMM's bits for a row depend on the row's
        # position among M = 8 (the chunk), so a candidate computed in another chunk position got another reward
        lin1, lin2 = self.head[1], self.head[3]
        r, d = rowwise_linear(F.gelu(rowwise_linear(F.gelu(feat), lin1)), lin2).unbind(-1)
        return r, d


def sigmas(cfg: DenoiserConfig) -> list[float]:
    """The sampling schedule: `denoise_steps` noise levels from sigma_max down (Karras rho = 7), then 0."""
    n, rho = cfg.denoise_steps, 7.0
    lo, hi = cfg.sigma_min ** (1 / rho), cfg.sigma_max ** (1 / rho)
    return [(hi + i / max(1, n - 1) * (lo - hi)) ** rho for i in range(n)] + [0.0]


@dataclass
class FrameHistory:
    """Per-slot state: the last `context` frame latents, oldest first. latents float [S, K, C, h, w]."""

    latents: torch.Tensor


class DenoisingWorldModel(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = PatchAutoencoder(cfg)
        self.denoiser = Denoiser(cfg)

    @classmethod
    def from_config(cls, d: dict) -> DenoisingWorldModel:
        return cls(DenoiserConfig.from_dict(d))

    # ---- the world-model protocol -----------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        c = self.cfg
        h, w = c.grid
        return ModelSpec(c.name, c.height, c.width, h * w, 0, c.n_actions, 0, c.action_names, c.context,
                         c.max_horizon, output="latent")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def allocate_state(self, slots: int) -> FrameHistory:
        c = self.cfg
        p = next(self.parameters())
        return FrameHistory(torch.zeros(slots, c.context, c.latent_ch, *c.grid, device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(frames)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)

    def unknown_actions(self, batch: int, count: int, device=None):
        return torch.zeros(batch, count, dtype=torch.int64, device=device or self.device), None

    @torch.no_grad()
    def prefill(self, state: FrameHistory, slots, latents, actions=None, known=None) -> None:
        # latents [B, T, C, h, w]: the last `context` frames (the earliest repeated when T < context)
        k, t = self.cfg.context, latents.shape[1]
        idx = torch.arange(t - k, t, device=latents.device).clamp(min=0)
        state.latents[slots] = latents[:, idx].to(state.latents.dtype)

    def fork(self, state: FrameHistory, src: int, dst: torch.Tensor) -> None:
        state.latents[dst] = state.latents[src : src + 1].clone()

    def advance(self, state: FrameHistory, slots, latents) -> None:
        hist = state.latents[slots]
        state.latents[slots] = torch.cat([hist[:, 1:], latents[:, None].to(hist.dtype)], 1)

    @torch.no_grad()
    def step(self, state: FrameHistory, slots, actions, known=None, *, noise: Noise | None = None):
        ctx = state.latents[slots].flatten(1, 2)  # [B, K*C, h, w]
        b, c = ctx.shape[0], self.cfg.latent_ch
        shape = (c, *self.cfg.grid)
        z = noise.normal(shape) if noise is not None else torch.zeros(b, *shape, device=ctx.device)
        z = z.to(ctx.dtype)
        outs = []
        for i in range(0, b, CHUNK):  # fixed-size chunks: a row's arithmetic never depends on the batch
            n = min(CHUNK, b - i)
            pad = torch.arange(i, i + CHUNK, device=ctx.device).clamp(max=b - 1)  # the last rows repeated
            cx, ax, zx = ctx[pad], actions[pad], z[pad]
            x = self.sample(cx, ax, zx)
            r, d = self.denoiser.heads(cx, x, ax)
            outs.append((x[:n], r[:n], d[:n]))
        x, reward, done = (torch.cat(t) for t in zip(*outs, strict=True))
        return x, reward, rowwise_sigmoid(calibrate_done(done, self.cfg.done_scale, self.cfg.done_bias))

    def sample(self, ctx: torch.Tensor, actions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Euler steps of the probability-flow ODE from sigma_max * z down to 0. z [B, C, h, w] standard normal."""
        sig = sigmas(self.cfg)
        x = z * sig[0]
        for s, s_next in zip(sig[:-1], sig[1:], strict=True):
            d = self.denoiser(x, torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype), ctx, actions)
            x = x + (s_next - s) * (x - d) / s  # Euler: dx/dsigma = (x - D(x)) / sigma
        return x.clamp(-1, 1)

    def param_counts(self) -> dict[str, int]:
        return {"autoencoder": sum(p.numel() for p in self.autoencoder.parameters()),
                "denoiser": sum(p.numel() for p in self.denoiser.parameters())}


def edm_loss(model: DenoisingWorldModel, ctx, nxt, actions, reward, done, gen: torch.Generator):
    """EDM training loss on clean next latents nxt [B, C, h, w] given ctx [B, K*C, h, w]; + reward / done heads."""
    cfg = model.cfg
    b = nxt.shape[0]
    sigma = (torch.randn(b, generator=gen) * 1.2 - 0.4).exp().clamp(cfg.sigma_min, 80.0)  # log-normal
    x = nxt + torch.randn(nxt.shape, generator=gen) * sigma.view(-1, 1, 1, 1)
    d = model.denoiser(x, sigma, ctx, actions)
    sd = cfg.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoise = (weight.view(-1, 1, 1, 1) * (d - nxt) ** 2).mean()
    r, dl = model.denoiser.heads(ctx, nxt, actions)
    rw = 1.0 + 19.0 * (reward > 0).float()
    heads = 5.0 * (rw * (r - reward) ** 2).mean() + 2.0 * F.binary_cross_entropy_with_logits(dl, done)
    return denoise + heads, denoise


def psnr_unit(mse: float) -> float:
    """PSNR of an MSE on [-1, 1] values (peak-to-peak 2)."""
    return psnr(mse, peak=2.0)
