"""How a batch runs on the device, shared by the engine and the runtime backends:
- shape buckets: step batches are padded to 1, 2, 4, ... max so compiled graphs and TensorRT profiles are reused;
- fixed chunks: encode / decode in chunks of exactly CHUNK rows (batch invariance);
- the token sampler: the chunked PyTorch sampler (worldserve.model.sampling.sample) or the Triton kernel (on CUDA
  tensors the default: one program per token, no [B, N, V] temporaries; `use_triton=True` forces it, tests run
  it on the CPU under TRITON_INTERPRET=1);
- the one device -> host copy of a step's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.sampling import sample


def pow2(n: int) -> int:
    # the smallest power of two >= n (the padded batch size compiled shapes are keyed on)
    b = 1
    while b < n:
        b *= 2
    return b


def bucket(n: int, max_n: int) -> int:
    return min(pow2(n), max(max_n, n))


def buckets(max_n: int) -> list[int]:
    out, b = [], 1
    while b < max_n:
        out.append(b)
        b *= 2
    return [*out, max_n]


def pad_to(x: torch.Tensor, n: int, value) -> torch.Tensor:
    # x: [B, ...] -> [n, ...], extra rows filled with `value`
    if x.shape[0] == n:
        return x
    pad = torch.full((n - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


CHUNK = 8


def run_fixed_chunks(fn, x: torch.Tensor, size: int = CHUNK) -> torch.Tensor:
    """Apply a per-row function in chunks of exactly `size` rows (the last one padded).

    CPU conv / matmul kernels pick their algorithm by batch size, so the same row can round differently
    in a batch of 1 and a batch of 16. A fixed chunk size keeps encode / decode batch-invariant.
    """
    outs = []
    for i in range(0, x.shape[0], size):
        part = x[i : i + size]
        n = part.shape[0]
        if n < size:
            part = torch.cat([part, part[:1].expand(size - n, *part.shape[1:])])
        outs.append(fn(part)[:n])
    return torch.cat(outs)


def _triton():
    try:
        from ..kernels.sampling import triton_sample
    except ImportError:  # triton not installed: the PyTorch sampler everywhere
        return None
    return triton_sample


class Sampler:
    def __init__(self, use_triton: bool = False):
        self.forced = _triton() if use_triton else None
        if use_triton and self.forced is None:
            raise RuntimeError("triton kernels requested but triton is not installed (pip install triton)")
        self._cuda = None

    def __call__(self, logits, temperature, seed, candidate, step) -> torch.Tensor:
        # logits [B, N, V]; the rest [B] -> int64 [B, N]
        if self.forced is not None:
            return self.forced(logits, temperature, seed, candidate, step)
        if logits.is_cuda:
            if self._cuda is None:
                self._cuda = _triton() or sample
            return self._cuda(logits, temperature, seed, candidate, step)
        return sample(logits, temperature, seed, candidate, step)


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
