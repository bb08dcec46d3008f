"""What a world model is, as every layer sees it: no torch here, so the front ends (which never load torch) share
this one definition with the engine and the models. `messages.ModelInfo` is a served model's spec plus how it is
served."""

from __future__ import annotations

from dataclasses import dataclass

OUTPUTS = ("logits", "latent")
DECODINGS = ("parallel", "maskgit", "autoregressive")  # how a token model fills a frame (model/maskgit.py)
SCHEDULES = ("cosine", "sequential")  # MaskGIT: tokens known after each pass
CONFIDENCES = ("sampled", "max")  # MaskGIT: what ranks the sampled tokens


@dataclass(frozen=True)
class ModelSpec:
    name: str
    height: int
    width: int
    tokens_per_frame: int  # latent positions per frame (tokens, or cells of a latent grid)
    vocab_size: int  # token models: entries per token; latent models: 0
    n_actions: int  # > 0: discrete
    action_dim: int  # > 0: continuous
    action_names: tuple[str, ...]
    context_window: int
    max_horizon: int
    output: str = "logits"  # "logits" (the engine samples) | "latent" (the model returns the next latent)
    # within-frame decoding of a token model (model/maskgit.py). "parallel": sample every token of step's logits at
    # once. "maskgit": `passes` passes of fill + unmask_pass, cosine schedule, most confident tokens kept.
    # "autoregressive": raster order, tokens_per_pass tokens a pass. The passes sample at decode_temperature x the
    # request's temperature; MaskGIT keeps the tokens of highest confidence + choice_noise x temperature x Gumbel
    # noise, confidence "sampled" (log p of the token drawn: MaskGIT's) or "max" (log max p), along the schedule
    # "cosine" (MaskGIT's) or "sequential" (N - P + 1 tokens first, then one a pass).
    decoding: str = "parallel"
    passes: int = 1
    decode_temperature: float = 1.0
    tokens_per_pass: int = 0
    choice_noise: float = 1.0
    schedule: str = "cosine"
    confidence: str = "sampled"

    @property
    def continuous(self) -> bool:
        return self.action_dim > 0

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"spec.output must be one of {OUTPUTS}, got {self.output!r}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"spec.decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.schedule not in SCHEDULES or self.confidence not in CONFIDENCES:
            raise ValueError(f"spec.schedule must be one of {SCHEDULES}, spec.confidence one of {CONFIDENCES}")
        if self.decoding != "parallel" and self.output != "logits":
            raise ValueError("only a token model (output 'logits') decodes a frame in passes")
        if (self.n_actions > 0) == (self.action_dim > 0):
            raise ValueError("exactly one of n_actions (discrete) or action_dim (continuous) must be > 0")
