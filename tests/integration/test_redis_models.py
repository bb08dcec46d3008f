"""Redis mode with a model repository: one worker per model, one front end routing each request to its model's
stream; both the token model and the continuous-latent model served through Redis."""

from __future__ import annotations

import time

import numpy as np

from tests.conftest import ROOT, start_stack


def test_two_models_through_redis(tmp_path, redis_server, real_frames):
    st = start_stack(tmp_path, redis_server, 1, ("--max-slots", "8"))  # tiny
    try:
        st.add_worker(tmp_path, "--model-dir", str(ROOT / "models" / "denoiser"), "--max-slots", "8")
        rest, g = st.rest(), st.grpc_client()
        names = set()
        for _ in range(100):  # the front end learns a model when its worker announces it
            names = {m["name"] for m in rest.models()}
            if names == {"tiny", "denoiser"}:
                break
            time.sleep(0.1)
        assert names == {"tiny", "denoiser"}
        for name in ("tiny", "denoiser"):
            frames = g.predict(name, real_frames[:4], [2, 0], context_actions=[2, 2, 0])
            assert frames.shape == (2, 64, 64, 3)
            assert np.abs(frames[0].astype(int) - real_frames[4]).mean() < 8, name
        # seeded sampling through Redis on the latent model: reproducible
        a = [e.frame for e in g.rollout("denoiser", real_frames[:2], [[2, 2]], seed=5, temperature=1.0)]
        b = [e.frame for e in g.rollout("denoiser", real_frames[:2], [[2, 2]], seed=5, temperature=1.0)]
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        g.close()
    finally:
        st.stop()
