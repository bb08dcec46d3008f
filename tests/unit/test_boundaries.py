"""Import boundaries and message encoding."""

import subprocess
import sys

import numpy as np

from worldserve.messages import ErrorCode, FrameMode, RolloutEvent, RolloutRequest, SessionAction, pack, unpack


def test_api_package_never_imports_torch():
    code = ("import sys, worldserve.api.http, worldserve.api.grpc_server, worldserve.queue.redis_queue, "
            "worldserve.client.client; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_messages_roundtrip():
    req = RolloutRequest("abc", "tiny", np.arange(2 * 64 * 64 * 3, dtype=np.uint8).reshape(2, 64, 64, 3) % 251,
                         np.array([[0, 1, 2]]), np.array([1]), FrameMode.NONE, True, 2**62, 0.5, 123.5, session=True)
    back = unpack(pack(req))
    assert back.id == "abc" and back.frames == FrameMode.NONE and back.seed == 2**62 and back.session
    np.testing.assert_array_equal(back.context, req.context)
    np.testing.assert_array_equal(back.actions, req.actions)
    ev = RolloutEvent("abc", 3, 4, 0.25, 0.5, frame=req.context[0], tokens=np.arange(64))
    e2 = unpack(pack(ev))
    assert (e2.candidate, e2.step, e2.reward) == (3, 4, 0.25)
    np.testing.assert_array_equal(e2.frame, ev.frame)
    end = unpack(pack(RolloutEvent.end("abc", ErrorCode.DEADLINE_EXCEEDED, "late")))
    assert end.final and end.error == ErrorCode.DEADLINE_EXCEEDED and end.frame is None
    sa = unpack(pack(SessionAction("abc", np.asarray(2))))
    assert int(sa.action) == 2
