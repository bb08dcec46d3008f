"""Does the serving state fit the device? The KV cache and one step's activations against free memory.

    kv_cache_bytes(cfg, slots, dtype)          2 (k, v) x layers x slots x window x tokens x d_model x bytes
    step_activation_bytes(cfg, batch, dtype)   transient memory of one step of `batch` rows (estimate)
    available_bytes(device)                    CPU: MemAvailable (/proc/meminfo); CUDA: torch.cuda.mem_get_info
    check_state_fits(cfg, slots, device, dtype) -> the start-up log line; raises DoesNotFit when it does not fit

The weights are already on the device when this runs (their bytes are no longer available), so the check is
state + the largest step's activations <= available x HEADROOM. The step estimate counts the logits in the
model dtype plus one fp32 copy (the sampler), the gathered window of one layer (k, v), its attention scores
and the MLP hidden: what one bucket holds at its peak, whatever the number of buckets.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigurationError, ModelConfig

HEADROOM = 0.9  # leave 10 % of what is free to the allocator, the front end and the OS
GB = 1e9


class DoesNotFit(ConfigurationError):
    """The configured slots do not fit the device's memory (start-up stops with the message)."""


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(cfg: ModelConfig, slots: int, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * slots * cfg.window * cfg.tokens_per_frame * cfg.d_model * _elt(dtype)


def step_activation_bytes(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    e, n, d = _elt(dtype), cfg.tokens_per_frame, cfg.d_model
    logits = n * cfg.vocab_size * (e + 4)  # model dtype + one fp32 copy for sampling
    layer = 2 * cfg.window * n * d * e + cfg.n_heads * n * cfg.window * n * 4 + n * cfg.mlp_ratio * d * 4
    return batch * (logits + layer + 16 * n * d * 4)


def available_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_state_fits(cfg: ModelConfig, slots: int, device, dtype: torch.dtype, available: int | None = None) -> str:
    """One line for the start-up log saying what the KV cache takes; DoesNotFit if state + a step do not fit."""
    kv = kv_cache_bytes(cfg, slots, dtype)
    act = step_activation_bytes(cfg, slots, dtype)
    free = available_bytes(device) if available is None else available
    name = str(dtype).removeprefix("torch.")
    line = (f"KV cache: {slots} slots x {cfg.window} frames x {cfg.n_layers} layers x {cfg.tokens_per_frame} tokens "
            f"x {cfg.d_model} x 2 (k, v) x {name} = {kv / GB:.2f} GB; one step of {slots} rows ~{act / GB:.2f} GB; "
            f"{free / GB:.1f} GB available on {torch.device(device)}")
    if kv + act > HEADROOM * free:
        per_slot = (kv + act) / slots
        fits = max(0, int(HEADROOM * free / per_slot) - 1)  # minus the engine's padding slot
        raise DoesNotFit(f"does not fit the device's memory: {line}. Needs {(kv + act) / GB:.2f} GB of "
                         f"{HEADROOM:.0%} x {free / GB:.1f} GB. Lower --max-slots (at most ~{fits} fit; the engine "
                         f"holds max_slots + 1 + engine.context_cache_slots slots, and context_cache_slots=0 turns the "
                         f"context cache off) or use --precision bf16 (half the cache)")
    return line
