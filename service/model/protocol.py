"""The engine's only view of a world model: `WorldModelProtocol`. Any class with these members is served.

Token models (IRIS / Genie / GAIA-1 style) return next-token logits from `step` and the engine samples them;
continuous-latent models (DIAMOND / Oasis style denoisers, Dreamer-style recurrent models) return the next latent
themselves, drawing any randomness from `noise` (counter-based streams keyed by seed, candidate and step, so a
seeded rollout reproduces alone, in any batch and on any worker). The per-slot state is opaque to the engine:
a KV ring buffer, a recurrent hidden state, a frame history; the model allocates it, the engine only passes it
back with slot indices.

    spec                    ModelSpec (below)
    device                  torch.device the state and inputs live on
    allocate_state(S)       state for S slots (the engine allocates once, at start-up)
    encode(frames)          uint8 [B, H, W, 3] -> latents [B, *latent_shape] (int64 tokens or float)
    unknown_actions(B, C)   placeholder context actions [B, C, ...] and a known mask [B, C] bool (or None)
    prefill(state, slots, latents [B, C, *latent_shape], actions [B, C-1, ...], known [B, C-1] | None)
    fork(state, src, dst)   copy slot src into every slot of dst int64 [K]
    step(state, slots, actions, *, noise=None)
                            -> (out, reward float [B], done probability [B]); out is logits float [B, N, V]
                               (spec.output == "logits") or the next latent [B, *latent_shape] ("latent")
    advance(state, slots, latents)   the chosen next latents [B, *latent_shape] become the slots' newest frame
    decode(latents)         [B, *latent_shape] -> uint8 [B, H, W, 3]

Actions are int64 [B] (discrete, spec.n_actions > 0) or float32 [B, action_dim] (continuous).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .sampling import counter_normal
from .spec import OUTPUTS, ModelSpec

__all__ = ["OUTPUTS", "ModelSpec", "Noise", "WorldModelProtocol", "check_model"]



@dataclass(frozen=True)
class Noise:
    """Per-row keys of the engine's counter-based streams; `normal` draws batch-invariant Gaussian noise.

    Row b draws from stream (seed[b], candidate[b], step[b]); `draw` separates several draws in one step
    (e.g. one per denoising step). Row b's numbers depend on its keys only, never on the batch.
    """

    seed: torch.Tensor  # int64 [B]
    candidate: torch.Tensor  # int64 [B]
    step: torch.Tensor  # int64 [B]

    def normal(self, shape: tuple[int, ...], draw: int = 0) -> torch.Tensor:
        # -> float32 [B, *shape]
        return counter_normal(self.seed, self.candidate, self.step, shape, draw)


@runtime_checkable
class WorldModelProtocol(Protocol):
    spec: ModelSpec
    device: torch.device

    def allocate_state(self, slots: int) -> Any: ...

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def unknown_actions(self, batch: int, count: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def prefill(self, state: Any, slots: torch.Tensor, latents: torch.Tensor, actions: torch.Tensor,
                known: torch.Tensor | None = None) -> None: ...

    def fork(self, state: Any, src: int, dst: torch.Tensor) -> None: ...

    def step(self, state: Any, slots: torch.Tensor, actions: torch.Tensor, *,
             noise: Noise | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def advance(self, state: Any, slots: torch.Tensor, latents: torch.Tensor) -> None: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def check_model(model: object) -> None:
    """A clear start-up error naming what a model class lacks (instead of an AttributeError at the first request)."""
    members = ("spec", "device", "allocate_state", "encode", "unknown_actions", "prefill", "fork", "step",
               "advance", "decode")
    missing = [m for m in members if not hasattr(model, m)]
    if missing:
        raise TypeError(f"{type(model).__qualname__} does not implement the world-model protocol: missing "
                        f"{', '.join(missing)} (see worldserve.model.protocol)")
    if not isinstance(model.spec, ModelSpec):
        raise TypeError(f"{type(model).__qualname__}.spec must be a worldserve.model.protocol.ModelSpec")
