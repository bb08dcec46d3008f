"""Per-frame fields on every transport: confidence (issue 19 item 4) arrives alike over REST predict and rollouts,
gRPC Predict, Rollout and Session, and the WebSocket session; absent where the model gives none."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.e2e
MODEL = "tiny"
ACTIONS = [2, 2, 1, 2]


def _confidences(server, real_frames) -> dict[str, list]:
    ctx, kw = real_frames[:2], dict(seed=5, temperature=1.0, frame_encoding="raw")
    rest, g = server.rest(), server.grpc_client()
    try:
        out = {
            "rest_predict": [e.confidence for e in rest.predict_events(MODEL, ctx, ACTIONS, **kw)],
            "rest_rollout": [e.confidence for e in rest.rollout(MODEL, ctx, [ACTIONS], **kw)],
            "grpc_predict": [e.confidence for e in g.predict_events(MODEL, ctx, ACTIONS, **kw)],
            "grpc_rollout": [e.confidence for e in g.rollout(MODEL, ctx, [ACTIONS], **kw)],
        }
        with g.session(MODEL, ctx, **kw) as s:
            out["grpc_session"] = [s.step(a).confidence for a in ACTIONS]
        with rest.session(MODEL, ctx, **kw) as s:
            out["ws_session"] = [s.step(a).confidence for a in ACTIONS]
    finally:
        rest.close()
        g.close()
    return out


def test_confidence_arrives_alike_on_every_transport(server, real_frames):
    got = _confidences(server, real_frames)
    ref = got["rest_predict"]
    assert len(ref) == len(ACTIONS)
    for name, conf in got.items():
        assert len(conf) == len(ACTIONS), name
        # None (the engine gives none) on every transport, or a value on every transport and step
        assert [c is None for c in conf] == [c is None for c in ref], (name, conf, ref)
        for c, r in zip(conf, ref, strict=True):
            if c is not None:
                assert 0.0 <= c <= 1.0, (name, c)
                assert c == pytest.approx(r, abs=1e-6), (name, conf, ref)  # gRPC carries a float32


def test_confidence_absent_not_null_in_json_when_none(server, real_frames):
    """REST omits the field when the model gives none (a client reading .get('confidence') sees None alike)."""
    import base64

    import httpx

    from worldserve.api.images import encode_frame

    f = real_frames[0]
    body = {"context": [{"encoding": "png", "data": base64.b64encode(encode_frame(f, "png")).decode()}],
            "actions": [2], "options": {"frames": "none"}}
    r = httpx.post(f"{server.http}/v1/models/{MODEL}/predict", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    step = r.json()["steps"][0]
    c = step.get("confidence")
    assert c is None or (isinstance(c, float) and 0.0 <= c <= 1.0)
    assert "confidence" not in step or c is not None
    assert np.isfinite(step["reward"])
