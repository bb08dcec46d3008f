"""End-to-end: the `base` preset (FSQ tokenizer, 64k vocabulary) served at bf16 returns frames over REST and gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import start_server
from worldserve.client.client import GrpcClient, RestClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base_bf16(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("base-bf16"), "--preset", "base", "--precision", "bf16",
                       "--max-slots", "2")
    yield srv
    srv.stop()


def test_base_bf16_serves_frames_over_rest_and_grpc(base_bf16):
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, (2, 4)).astype(np.float32).tolist()  # base: continuous actions, 4 dims
    rest = RestClient(base_bf16.http)
    [info] = [m for m in rest.models() if m["name"] == "base"]
    assert info["precision"] == "bf16"
    got = rest.predict("base", ctx, actions, seed=3, temperature=1.0)
    assert got.shape == (2, 64, 64, 3) and got.dtype == np.uint8
    g = GrpcClient(base_bf16.grpc)
    try:
        np.testing.assert_array_equal(g.predict("base", ctx, actions, seed=3, temperature=1.0), got)
    finally:
        g.close()
        rest.close()
