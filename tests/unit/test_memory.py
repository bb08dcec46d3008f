"""Start-up memory check: the KV cache size is stated, and a slot count that does not fit is refused before
anything is allocated."""

import dataclasses
import logging

import pytest
import torch

from worldserve.model.config import PRESETS
from worldserve.model.memory import DoesNotFit, available_bytes, check_state_fits, kv_cache_bytes
from worldserve.model.world_model import build
from worldserve.runtime.compiled import compile_model


def test_kv_cache_bytes_is_the_allocated_size():
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=32, n_heads=2, n_layers=2, window=3)
    m = build(cfg)
    for dtype in (torch.float32, torch.bfloat16):
        cache = m.to(dtype).allocate_cache(5)
        assert kv_cache_bytes(cfg, 5, dtype) == cache.k.nbytes + cache.v.nbytes
    # base at the default 64 slots (+1 padding): 2 x 8 layers x 65 x 8 frames x 64 tokens x 512 x 4 B
    assert kv_cache_bytes(PRESETS["base"], 65, torch.float32) == 2 * 8 * 65 * 8 * 64 * 512 * 4


def test_available_memory_is_real():
    free = available_bytes("cpu")
    assert 1e8 < free < 1e14  # this machine's MemAvailable, not a placeholder


def test_state_that_does_not_fit_is_refused_before_allocating(caplog):
    cfg = PRESETS["tiny"]
    line = check_state_fits(cfg, 65, "cpu", torch.float32, available=8 * 10**9)
    assert "KV cache: 65 slots x 8 frames x 4 layers" in line and "GB" in line
    with pytest.raises(DoesNotFit, match=r"does not fit the device's memory.*at most ~\d+ fit"):
        check_state_fits(cfg, 65, "cpu", torch.float32, available=10**8)
    m = build(dataclasses.replace(cfg, window=64))
    with pytest.raises(DoesNotFit, match="Lower --max-slots"):  # ~9 TB: refused, not attempted
        m.allocate_state(10**6)
    with caplog.at_level(logging.INFO, logger="worldserve"):
        state = m.allocate_state(3)  # the engine's path states the cache size in the log
    assert state.slots == 3 and any("KV cache: 3 slots" in r.getMessage() for r in caplog.records)
    with pytest.raises(DoesNotFit):  # backends check the same way
        compile_model(m).allocate_state(10**6)
