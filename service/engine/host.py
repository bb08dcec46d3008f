"""A step's outputs to host memory: one device -> host copy per engine step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class HostOutputs:
    reward: np.ndarray  # float32 [b]
    done: np.ndarray  # float32 [b]
    tokens: np.ndarray  # int32 [b, N]
    frames: np.ndarray | None  # uint8 [F, H, W, 3]


def to_host(reward: torch.Tensor, done: torch.Tensor, tokens: torch.Tensor, frames: torch.Tensor | None) -> HostOutputs:
    """A step's outputs to host memory in ONE copy: packed into one byte buffer on the device, then moved."""
    b, n = tokens.shape
    parts = [reward.float().reshape(b), done.float().reshape(b)]
    if not tokens.is_cuda:  # host memory already: views, no copy at all
        return HostOutputs(parts[0].numpy(), parts[1].numpy(), tokens.to(torch.int32).numpy(),
                           None if frames is None else frames.numpy())
    chunks = [torch.cat(parts).view(torch.uint8), tokens.to(torch.int32).reshape(-1).view(torch.uint8)]
    if frames is not None:
        chunks.append(frames.reshape(-1))
    buf = torch.cat(chunks).cpu().numpy()  # the one device -> host transfer (and synchronisation) of a step
    f32 = buf[: 8 * b].view(np.float32)
    tok = buf[8 * b : 8 * b + 4 * b * n].view(np.int32).reshape(b, n)
    fr = None if frames is None else buf[8 * b + 4 * b * n :].reshape(frames.shape)
    return HostOutputs(f32[:b], f32[b:], tok, fr)
