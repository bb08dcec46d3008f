"""Many gRPC clients in one process (a load generator, a vectorized trainer's workers): each GrpcClient has its own
connection, so 48 concurrent streams from 48 clients are never refused by the server's streams-per-connection limit
(32). Before, gRPC shared one connection between every channel to the same target and the calls past 32 ended
UNAVAILABLE (RST_STREAM REFUSED_STREAM)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import E2E_KEY
from worldserve.client.client import GrpcClient

pytestmark = pytest.mark.e2e


def test_48_clients_in_one_process_all_get_answers(server, real_frames):
    errors, done = [], []
    start = threading.Barrier(48)

    def one(i: int) -> None:
        c = GrpcClient(server.grpc, api_key=E2E_KEY)
        try:
            start.wait(30)
            evs = list(c.rollout("tiny", real_frames[:1], [[2] * 12], frames="none", seed=i))
            done.append(len(evs))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(done) == 48, errors[:3]
