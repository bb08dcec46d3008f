"""Per-frame tokenizers: uint8 [B, 64, 64, 3] <-> int64 tokens [B, 8, 8] (flattened to [B, 64]).

Two kinds, chosen by `ModelConfig.tokenizer` (`make_tokenizer`):

- "vq" (the trained tiny model): patch vector quantization. Every p x p patch becomes the index of the
  nearest codebook entry in pixel space; decoding puts that entry back. The codebook is fitted by k-means
  (k-means++ seeding weighted by patch counts, then Lloyd steps) over the training patches. Strictly per
  patch, so a token means one cell image whatever surrounds it, and D^2 seeding gives rare patches (the
  agent's four headings: 1 cell in 64) their own codes. Learned conv encoders on this data aliased cells
  (a 3x3 mixing conv: 13 cell images -> 29 context-dependent tokens) or merged the rare headings (per-patch
  FSQ: 10 codes for 16 cell images; per-patch VQ trained by gradient: 6-13 codes). iGPT's k-means colour
  palette is the same idea one level down.
- "fsq" (the random `base` / `large` presets): finite scalar quantization (Mentzer et al., 2023) over a
  conv encoder; the encoder emits len(levels) channels per token, each bounded with tanh and rounded to one
  of `levels[i]` values; the token id is the mixed-radix number of the rounded values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class FSQ(nn.Module):
    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        lv = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), lv[:-1]]), 0)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        # z: [..., D] float -> [..., D] in (-(L-1)/2, (L-1)/2); odd and even levels both centred on a grid
        half = (self.levels - 1).to(z.dtype) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        # straight-through rounding; returns normalised codes in [-1, 1]
        zb = self.bound(z)
        zq = zb + (torch.round(zb) - zb).detach()
        half = (self.levels // 2).to(z.dtype)
        return zq / half

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        # codes: [..., D] in [-1, 1] -> int64 [...]
        half = (self.levels // 2).to(codes.dtype)
        digits = torch.round(codes * half + half).to(torch.int64)
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: int64 [...] -> float [..., D] in [-1, 1]
        digits = (idx.unsqueeze(-1) // self.basis) % self.levels
        half = (self.levels // 2).to(torch.float32)
        return (digits.to(torch.float32) - half) / half


def to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # uint8 pixels [...] -> float [...] in [-1, 1]
    return x.to(dtype).div(127.5).sub(1.0)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    # float [...] in [-1, 1] -> uint8 pixels [...] (rounded, clamped)
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def patchify(frames: torch.Tensor, p: int) -> torch.Tensor:
    # [B, H, W, 3] -> [B, N, p*p*3]: one row per p x p patch, row-major patches, (y, x, channel) inside
    b, hh, ww, _ = frames.shape
    h, w = hh // p, ww // p
    return frames.reshape(b, h, p, w, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * 3)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    # [B, N, p*p*3] -> [B, H, W, 3], the inverse of patchify
    b, (h, w) = x.shape[0], grid
    return x.reshape(b, h, w, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, 3)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # z float [..., D], codebook [K, D] -> int64 [...]: argmin_k |z - c_k|^2 = argmin_k (|c_k|^2 - 2 z.c_k)
    return (codebook.pow(2).sum(-1) - 2 * z @ codebook.t()).argmin(-1)


class Tokenizer(nn.Module):
    """FSQ over a learned conv encoder / decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, p, d = cfg.tok_channels, cfg.patch, len(cfg.fsq_levels)
        self.cfg = cfg
        self.fsq = FSQ(cfg.fsq_levels)
        # patchify (one token per p x p cell), then a little spatial mixing between neighbouring cells
        self.enc = nn.Sequential(
            nn.Conv2d(3, c, p, stride=p), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 1), nn.GELU(),
            nn.Conv2d(c, d, 1),
        )
        self.dec = nn.Sequential(
            nn.Conv2d(d, c, 1), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 1), nn.GELU(),
            nn.ConvTranspose2d(c, 3, p, stride=p),
        )

    @staticmethod
    def to_float(frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]
        return to_unit(frames.permute(0, 3, 1, 2))

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        # float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]
        return from_unit(x).permute(0, 2, 3, 1).contiguous()

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        # float [B, 3, H, W] (any float dtype) -> float32 codes [B, h, w, D] in [-1, 1] (straight-through).
        # The convolutions run in the weights' dtype (fp32 / bf16 / fp16); the bounding and rounding run in
        # fp32 whatever that dtype is: tanh and round in bf16 would move values across rounding boundaries.
        z = self.enc(x.to(self.enc[0].weight.dtype)).permute(0, 2, 3, 1)
        return self.fsq.quantize(z.float())

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [B, h, w, D] -> [B, 3, H, W] in the weights' dtype (unclamped, ~[-1, 1])
        return self.dec(codes.permute(0, 3, 1, 2).to(self.dec[0].weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training path: reconstruct float frames through the quantizer
        return self.decode_codes(self.encode_codes(x))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> int64 [B, N]
        codes = self.encode_codes(self.to_float(frames))
        return self.fsq.codes_to_indices(codes).flatten(1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # int64 [B, N] -> uint8 [B, H, W, 3]
        h, w = self.cfg.grid
        codes = self.fsq.indices_to_codes(tokens.view(-1, h, w))  # float32 [B, h, w, D]
        return self.to_uint8(self.decode_codes(codes).float())


class PatchVQ(nn.Module):
    """Patch VQ: each p x p patch -> index of the nearest codebook patch (squared L2 in pixel space)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # float [K, p*p*3] in [-1, 1], one patch per row in (y, x, channel) order; random until fitted
        g = torch.Generator().manual_seed(0)
        self.codebook = nn.Parameter(torch.rand(cfg.codebook_size, cfg.patch * cfg.patch * 3, generator=g) * 2 - 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 [B, H, W, 3] -> int64 [B, N]. Distances in fp32 whatever the codebook's dtype: in bf16 the
        # |c|^2 - 2 z.c of two close codes round together and the argmin picks the wrong patch.
        return nearest_code(to_unit(patchify(frames, self.cfg.patch)), self.codebook.float())

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # int64 [B, N] -> uint8 [B, H, W, 3]
        return from_unit(unpatchify(self.codebook[tokens].float(), self.cfg.patch, self.cfg.grid))


def make_tokenizer(cfg: ModelConfig) -> nn.Module:
    return PatchVQ(cfg) if cfg.tokenizer == "vq" else Tokenizer(cfg)


def recon_loss(model: Tokenizer, frames: torch.Tensor) -> torch.Tensor:
    x = Tokenizer.to_float(frames)
    return F.mse_loss(model(x), x)
