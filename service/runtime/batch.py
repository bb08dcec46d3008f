"""How a batch runs on the device, shared by the engine and the runtime backends:
- shape buckets: step batches are padded to 1, 2, 4, ... max so compiled graphs and TensorRT profiles are reused
  (an eager model on the CPU runs its rows as they are: padding there is work for nothing, `exact_batches`);
- fixed chunks: encode / decode in chunks of exactly CHUNK rows on the CPU, GPU_CHUNK on CUDA (batch invariance:
  a row's frame never depends on how many rows were decoded with it);
- the token sampler: the chunked PyTorch sampler (worldserve.model.sampling.sample) or the Triton kernel (on CUDA
  tensors the default: one program per token, no [B, N, V] temporaries; `use_triton=True` forces it, tests run
  it on the CPU under TRITON_INTERPRET=1);
- the one device -> host copy of a step's outputs (pinned, side stream, one event wait).
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


def bucket(n: int, max_n: int, exact: bool = False) -> int:
    # rows a step computes for n rows: n (exact) or its power-of-two bucket, capped at the cache's slots
    return n if exact else min(pow2(n), max(max_n, n))


def exact_batches(model) -> bool:
    """Whether a model runs its rows unpadded: an eager PyTorch model on the CPU, where nothing is compiled or captured
    per shape (a 58-row step padded to 64 pays 10 % for nothing; 33 rows paid for 64). Compiled graphs, ONNX Runtime,
    TensorRT profiles and CUDA keep the power-of-two buckets. Batch invariance holds either way
    (tests/unit/test_engine_invariance.py)."""
    return model.device.type == "cpu" and getattr(model, "backend", "eager") == "eager"


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


CHUNK = 8  # rows per encode / decode call on the CPU
GPU_CHUNK = 64  # on CUDA: one call for up to 64 rows (a 64-row step decodes in one call), still a fixed shape


def decode_chunk(device: torch.device) -> int:
    """Rows per encode / decode call: fixed either way, so a row's frame does not depend on the batch it is in."""
    return GPU_CHUNK if device.type == "cuda" else CHUNK


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
    confidence: np.ndarray | None  # float32 [b] in [0, 1]: token models only (engine/execute.py)
    tokens: np.ndarray | None  # int32 [b, N], only when a row asked for its tokens
    frames: np.ndarray | None  # uint8 [F, H, W, 3]


SYNCS = [0]  # the waits `to_host` made (one a step on CUDA): engine/syncs.py adds them to the counted ones
_STREAMS: dict = {}  # device index -> its copy stream


def _side_stream(device: torch.device):
    # one copy stream per device, made on first use (no import-time CUDA work)
    s = _STREAMS.get(device.index)
    if s is None:
        s = _STREAMS[device.index] = torch.cuda.Stream(device)
    return s


def to_host(reward: torch.Tensor, done: torch.Tensor, confidence: torch.Tensor | None, tokens: torch.Tensor | None,
            frames: torch.Tensor | None, packed: bool | None = None) -> HostOutputs:
    """reward, done, confidence float [b] (confidence may be None); tokens int [b, N] | None; frames uint8
    [F, H, W, 3] | None -> host arrays.

    On a GPU everything is packed into one byte buffer on the device and moved in ONE non_blocking copy into pinned
    memory on a side stream, after an event on the compute stream; the host waits on the copy's event only (the
    step's one synchronisation: no pageable copy, no stream synchronize, so set_sync_debug_mode("error") passes).
    On the CPU the arrays are views, no copy at all (packed=True packs there too: the GPU's layout, tested).
    """
    b = reward.shape[0]
    parts = [reward.float().reshape(b), done.float().reshape(b)]
    if confidence is not None:
        parts.append(confidence.float().reshape(b))
    tok = None if tokens is None else tokens.to(torch.int32).reshape(b, -1)
    if not (reward.is_cuda if packed is None else packed):
        return HostOutputs(parts[0].numpy(), parts[1].numpy(), None if confidence is None else parts[2].numpy(),
                           None if tok is None else tok.numpy(), None if frames is None else frames.numpy())
    chunks = [torch.cat(parts).view(torch.uint8)]  # float32 [len(parts) * b] as bytes
    if tok is not None:
        chunks.append(tok.reshape(-1).view(torch.uint8))
    if frames is not None:
        chunks.append(frames.reshape(-1))
    dev = torch.cat(chunks)  # uint8 [bytes] on the device
    buf = _copy_to_host(dev) if dev.is_cuda else dev.numpy()
    f32, off = buf[: 4 * len(parts) * b].view(np.float32), 4 * len(parts) * b
    tok_h = None
    if tok is not None:
        tok_h = buf[off : off + tok.numel() * 4].view(np.int32).reshape(tok.shape)
        off += tok.numel() * 4
    fr = None if frames is None else buf[off:].reshape(frames.shape)
    conf = f32[2 * b : 3 * b] if confidence is not None else None
    return HostOutputs(f32[:b], f32[b : 2 * b], conf, tok_h, fr)


def _copy_to_host(packed: torch.Tensor) -> np.ndarray:
    # uint8 [bytes] on a GPU -> its bytes in pinned host memory: one non_blocking copy on the side stream, one wait
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
    ready = torch.cuda.Event()
    ready.record()  # the compute stream has produced `packed`
    side = _side_stream(packed.device)
    with torch.cuda.stream(side):
        side.wait_event(ready)
        host.copy_(packed, non_blocking=True)  # the one device -> host transfer of a step
        packed.record_stream(side)  # the allocator keeps it until the copy is done
        copied = torch.cuda.Event()
        copied.record(side)
    copied.synchronize()  # the step's one wait: its outputs are on the host
    SYNCS[0] += 1
    return host.numpy()
