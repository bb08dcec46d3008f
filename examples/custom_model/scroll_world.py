"""A minimal world model served by worldserve: the camera pans by the action. Implements the model protocol."""

from dataclasses import dataclass

import torch
from torch import nn

from worldserve.model.protocol import ModelSpec, Noise


@dataclass
class Views:  # per-slot state: each slot's newest frame, float [S, 3, H, W] in [0, 1]
    frames: torch.Tensor


class ScrollWorld(nn.Module):
    def __init__(self, size: int = 64, speed: int = 4, noise_std: float = 0.0):
        super().__init__()
        self.size, self.speed, self.noise_std = size, speed, noise_std
        self.reward_gain = nn.Parameter(torch.ones(1))  # its weights live in model.safetensors
        self.spec = ModelSpec("scroll", size, size, 1, 0, 0, 2, (), 1, 64, output="latent")

    @classmethod
    def from_config(cls, cfg: dict) -> "ScrollWorld":
        return cls(cfg.get("size", 64), cfg.get("speed", 4), cfg.get("noise_std", 0.0))

    @property
    def device(self) -> torch.device:
        return self.reward_gain.device

    def allocate_state(self, slots: int) -> Views:
        return Views(torch.zeros(slots, 3, self.size, self.size))

    def encode(self, frames):  # uint8 [B, H, W, 3] -> float [B, 3, H, W]
        return frames.permute(0, 3, 1, 2).float() / 255

    def decode(self, latents):  # float [B, 3, H, W] -> uint8 [B, H, W, 3]
        return (latents.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def unknown_actions(self, batch, count, device=None):
        return torch.zeros(batch, count, 2), torch.zeros(batch, count, dtype=torch.bool)

    def prefill(self, state, slots, latents, actions, known=None):  # latents [B, C, 3, H, W]
        state.frames[slots] = latents[:, -1]

    def fork(self, state, src, dst):
        state.frames[dst] = state.frames[src : src + 1].clone()

    @torch.no_grad()
    def step(self, state, slots, actions, known=None, *, noise: Noise | None = None):
        # actions float [B, 2] in [-1, 1]: pan right / down by up to `speed` pixels
        sh = (actions * self.speed).round().long().tolist()
        nxt = torch.stack([f.roll((dy, dx), (1, 2)) for f, (dx, dy) in zip(state.frames[slots], sh, strict=True)])
        if self.noise_std and noise is not None:  # sensor noise from the engine's seeded streams
            nxt = nxt + self.noise_std * noise.normal(tuple(nxt.shape[1:]))
        reward = self.reward_gain * nxt.mean((1, 2, 3))
        return nxt, reward, torch.zeros(len(slots))

    def advance(self, state, slots, latents):
        state.frames[slots] = latents
