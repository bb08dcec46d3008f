"""What a world model is, as every layer sees it: no torch here, so the front ends (which never load torch) share
this one definition with the engine and the models. `messages.ModelInfo` is a served model's spec plus how it is
served."""

from __future__ import annotations

from dataclasses import dataclass

OUTPUTS = ("logits", "latent")


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

    @property
    def continuous(self) -> bool:
        return self.action_dim > 0

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"spec.output must be one of {OUTPUTS}, got {self.output!r}")
        if (self.n_actions > 0) == (self.action_dim > 0):
            raise ValueError("exactly one of n_actions (discrete) or action_dim (continuous) must be > 0")
