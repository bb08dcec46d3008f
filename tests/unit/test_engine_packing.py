"""The step's two copies, in the layout a GPU uses (packed=True runs it on the CPU): every per-row input through one
byte buffer (engine/inputs.to_device) and every output through one (runtime/batch.to_host) come back unchanged,
whatever the dtypes, shapes, odd byte counts and empty arrays."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from worldserve.engine.inputs import to_device
from worldserve.runtime.batch import to_host


def test_inputs_through_one_buffer_come_back_unchanged():
    g = np.random.default_rng(0)
    arrays = {
        "frames": g.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8),  # 315 bytes: the next one must realign
        "slots": np.array([4, 1, 64], np.int64),
        "none": np.array([], np.int64),
        "temperature": np.array([0.0, 1.0, 0.5], np.float32),  # 12 bytes
        "known": np.array([[True, False], [False, True], [True, True]]),
        "actions": g.uniform(-1, 1, (3, 2, 4)).astype(np.float32),
        "last": np.array([7], np.int64),
    }
    got = to_device(arrays, torch.device("cpu"), packed=True)
    for name, a in arrays.items():
        t = got[name]
        assert t.shape == a.shape and t.numpy().dtype == a.dtype, name
        np.testing.assert_array_equal(t.numpy(), a)


@pytest.mark.parametrize("conf,tokens,frames", list(itertools.product([False, True], repeat=3)))
def test_outputs_through_one_buffer_equal_the_plain_arrays(conf, tokens, frames):
    g = torch.Generator().manual_seed(1)
    b = 5
    args = (torch.randn(b, generator=g), torch.rand(b, generator=g),
            torch.rand(b, generator=g) if conf else None,
            torch.randint(0, 64000, (b, 64), generator=g) if tokens else None,
            torch.randint(0, 256, (3, 8, 8, 3), generator=g, dtype=torch.uint8) if frames else None)
    plain, packed = to_host(*args), to_host(*args, packed=True)
    for field in ("reward", "done", "confidence", "tokens", "frames"):
        p, q = getattr(plain, field), getattr(packed, field)
        assert (p is None) == (q is None), field
        if p is not None:
            assert p.dtype == q.dtype and p.shape == q.shape, field
            np.testing.assert_array_equal(p, q)
