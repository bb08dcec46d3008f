"""A step's outputs to host memory: one device -> host copy per engine step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class HostOutputs:
    reward: np.ndarray  # float32 [b]
    done: np.ndarray  # float32 [b]
    tokens: np.ndarray | None  # int32 [b, N], only when a row asked for its tokens
    frames: np.ndarray | None  # uint8 [F, H, W, 3]


def to_host(reward: torch.Tensor, done: torch.Tensor, tokens: torch.Tensor | None,
            frames: torch.Tensor | None) -> HostOutputs:
    """reward, done [b]; tokens int [b, N] | None; frames uint8 [F, H, W, 3] | None -> host arrays.

    On a GPU everything is packed into one byte buffer on the device and moved in ONE copy (one synchronisation
    per step); on the CPU the arrays are views, no copy at all.
    """
    b = reward.shape[0]
    parts = [reward.float().reshape(b), done.float().reshape(b)]
    tok = None if tokens is None else tokens.to(torch.int32).reshape(b, -1)
    if not reward.is_cuda:
        return HostOutputs(parts[0].numpy(), parts[1].numpy(), None if tok is None else tok.numpy(),
                           None if frames is None else frames.numpy())
    chunks = [torch.cat(parts).view(torch.uint8)]
    if tok is not None:
        chunks.append(tok.reshape(-1).view(torch.uint8))
    if frames is not None:
        chunks.append(frames.reshape(-1))
    buf = torch.cat(chunks).cpu().numpy()  # the one device -> host transfer of a step
    f32, off = buf[: 8 * b].view(np.float32), 8 * b
    tok_h = None
    if tok is not None:
        tok_h = buf[off : off + tok.numel() * 4].view(np.int32).reshape(tok.shape)
        off += tok.numel() * 4
    fr = None if frames is None else buf[off:].reshape(frames.shape)
    return HostOutputs(f32[:b], f32[b:], tok_h, fr)
