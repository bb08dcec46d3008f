"""Model configuration and presets. Pure data: no torch, no settings object."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .spec import CONFIDENCES, DECODINGS, SCHEDULES


class ConfigurationError(ValueError):
    """A model, backend, precision or memory configuration that cannot serve. Raised by library code; the
    command line turns it into a clean exit with the message (never a traceback, never SystemExit from here)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    # frames
    height: int = 64
    width: int = 64
    patch: int = 8  # one token per patch x patch pixels -> 8 x 8 tokens per frame
    # tokenizer: "vq" (patch VQ, vocabulary = codebook_size) or "fsq" (conv FSQ, vocabulary = prod(levels))
    tokenizer: str = "vq"
    codebook_size: int = 64
    fsq_levels: tuple[int, ...] = (5, 5, 5)
    tok_channels: int = 128
    # dynamics transformer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    window: int = 8  # context window W in frames (sliding KV cache)
    max_horizon: int = 64
    # actions: discrete (action_dim == 0, n_actions > 0) or continuous (action_dim > 0)
    n_actions: int = 3
    action_dim: int = 0
    action_names: tuple[str, ...] = ("left", "right", "forward")
    rope_base: float = 10000.0
    # within-frame decoding (model/maskgit.py). "parallel": every token of the next frame is sampled from the trunk's
    # one pass (no head: today's models). "maskgit" | "autoregressive": a small bidirectional transformer (the frame
    # head, head_layers x head_d_model) fills the frame in `passes` passes (autoregressive: tokens_per_pass tokens a
    # pass in raster order, 0 = ceil(N / passes)) at decode_temperature x the request's temperature; MaskGIT ranks
    # the sampled tokens by confidence ("sampled": log p of the token drawn, "max": log max p) + choice_noise x
    # temperature x Gumbel noise, along a schedule ("cosine", or "sequential": one token a pass at the end).
    decoding: str = "parallel"
    passes: int = 1
    decode_temperature: float = 1.0
    tokens_per_pass: int = 0
    choice_noise: float = 1.0
    schedule: str = "cosine"
    confidence: str = "sampled"
    head_layers: int = 0  # 0: no frame head
    head_d_model: int = 128
    head_heads: int = 4
    # post-hoc calibration of the done head (lab/calibrate.py, Platt scaling): the served done probability is
    # sigmoid(done_scale * logit + done_bias), applied in Dynamics.heads so every backend and precision gets it;
    # the default is the identity (the logit untouched, bit for bit)
    done_scale: float = 1.0
    done_bias: float = 0.0

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch

    @property
    def vocab_size(self) -> int:
        if self.tokenizer == "vq":
            return self.codebook_size
        v = 1
        for level in self.fsq_levels:
            v *= level
        return v

    @property
    def continuous(self) -> bool:
        return self.action_dim > 0

    @property
    def has_frame_head(self) -> bool:
        return self.head_layers > 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fsq_levels"] = list(self.fsq_levels)
        d["action_names"] = list(self.action_names)
        if self.done_scale == 1.0 and self.done_bias == 0.0:  # uncalibrated: config.json and export keys as before
            del d["done_scale"], d["done_bias"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("fsq_levels", "action_names"):
            if key in d:
                d[key] = tuple(d[key])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.tokenizer not in ("vq", "fsq"):
            raise ValueError(f"tokenizer must be 'vq' or 'fsq', got {self.tokenizer!r}")
        if self.height % self.patch or self.width % self.patch:
            raise ValueError("frame size must be a multiple of patch")
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ValueError("d_model must split into an even head_dim")
        if (self.n_actions > 0) == (self.action_dim > 0):
            raise ValueError("exactly one of n_actions (discrete) or action_dim (continuous) must be > 0")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.decoding != "parallel" and self.head_layers <= 0:
            raise ValueError(f"decoding {self.decoding!r} needs a frame head (head_layers > 0)")
        if self.passes < 1 or self.tokens_per_pass < 0 or self.decode_temperature < 0 or self.choice_noise < 0:
            raise ValueError("passes must be >= 1, tokens_per_pass >= 0, decode_temperature and choice_noise >= 0")
        if self.schedule not in SCHEDULES or self.confidence not in CONFIDENCES:
            raise ValueError(f"schedule must be one of {SCHEDULES} and confidence one of {CONFIDENCES}")
        check_done_calibration(self.done_scale, self.done_bias)
        if self.head_layers and (self.head_d_model % self.head_heads):
            raise ValueError("head_d_model must split into head_heads heads")


def check_done_calibration(scale: float, bias: float) -> None:
    """A done head's post-hoc calibration, sigmoid(scale * logit + bias), as every model's config holds it: raises
    ValueError unless scale > 0 (monotone) and bias is finite."""
    if not scale > 0 or not math.isfinite(bias):
        raise ValueError(f"done_scale must be > 0 (a monotone calibration) and done_bias a finite number, got "
                         f"{scale!r}, {bias!r}")


PRESETS: dict[str, ModelConfig] = {
    # trained on MiniGrid and shipped in models/tiny
    "tiny": ModelConfig(name="tiny"),
    # random weights, realistic compute; continuous actions so both action kinds are exercised
    "base": ModelConfig(
        name="base", d_model=512, n_layers=8, n_heads=8, n_actions=0, action_dim=4,
        action_names=(), tokenizer="fsq", tok_channels=256, fsq_levels=(8, 8, 8, 5, 5, 5),
    ),
    "large": ModelConfig(
        name="large", d_model=1024, n_layers=16, n_heads=16, tokenizer="fsq", tok_channels=256,
        fsq_levels=(8, 8, 8, 5, 5, 5), n_actions=16, action_names=(),
    ),
}
