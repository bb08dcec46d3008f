"""A C load generator for the REST edge: wrk (`apt-get install wrk`), closed loop, N keep-alive connections.

The Python load generator (bench/load.py `served`: N threads of httpx) spends ~2x the CPU of the gRPC one under the
GIL and answers each final NDJSON line late, so at 64 clients the engine waits for the clients' next requests
(bench/load.py's cores column: the engine process at 0.85 of a core over REST vs 0.98 over gRPC). wrk sends the same
requests (N bodies, client i's actions and seed, the same encodings: png both ways unless --encoding says otherwise)
from one C thread: what the REST edge serves when the client is not the bottleneck. Each response is read to its end
(the rollout's every NDJSON line); only 200s whose last line is an OK end count.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from worldserve.api.images import encode_frame

LUA = """
bodies = {%s}
counter = 0
failed = 0
ok = 0
ok_bytes = 0
threads = {}
setup = function(thread)
  table.insert(threads, thread)
end
response = function(status, headers, body)
  -- a 200 whose last NDJSON line is not an OK end (an engine error, a deadline) is not a served rollout
  if status == 200 and not string.find(body, '"final":true,"error":null', 1, true) then
    failed = failed + 1
  elseif status == 200 then
    ok = ok + 1
    ok_bytes = ok_bytes + #body
  end
end
request = function()
  counter = counter + 1
  return wrk.format("POST", "%s", {["Content-Type"] = "application/json"}, bodies[(counter %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local bad, good, good_bytes = 0, 0, 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("failed")
    good = good + t:get("ok")
    good_bytes = good_bytes + t:get("ok_bytes")
  end
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%f %%f %%f %%d %%d\\n", summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, summary.bytes, bad, latency:percentile(50), latency:percentile(99), latency.mean, good,
    good_bytes))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def lua_string(s: str) -> str:
    return "[==[" + s + "]==]"


def wrk_served(http: str, model: str, n: int, k: int, h: int, duration: float, frames: str, actions, ctx: np.ndarray,
               encoding: str = "png") -> dict:
    """N wrk connections looping rollouts for `duration` s (at least 10: a response must complete to size a frame)
    -> frames/s (every stream's frames, from the bytes read), request latency p50/p99 (the whole rollout), errors."""
    duration = max(duration, 10.0)
    frame = [{"encoding": encoding, "height": int(f.shape[0]), "width": int(f.shape[1]),
              "data": base64.b64encode(encode_frame(f, encoding)).decode()} for f in ctx]
    bodies = [json.dumps({"context": frame, "candidates": [actions(i, j) for j in range(k)],
                          "options": {"frames": frames, "frame_encoding": encoding, "seed": i}}) for i in range(n)]
    path = f"/v1/models/{model}/rollouts"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA % (", ".join(lua_string(b) for b in bodies), path))
        script = f.name
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{n}", f"-d{duration:g}s", "--timeout", "30s", "-s", script, http],
                             capture_output=True, text=True, timeout=duration + 60)
    finally:
        Path(script).unlink(missing_ok=True)
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+) (\d+) (\d+)", out.stdout)
    if not m:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    reqs, dur_us, errors, status_errors = (int(m.group(i)) for i in range(1, 5))
    bad = int(m.group(6))  # 200s whose stream did not end OK
    ok, ok_bytes, total_bytes = int(m.group(10)), int(m.group(11)), int(m.group(5))
    wall = dur_us / 1e6
    # frames of every stream, the ones still running at the end too (as bench/load.served counts events): the bytes
    # read over the body bytes a frame takes in a complete response (its headers add < 0.1 %)
    frames = total_bytes / (ok_bytes / (ok * k * h)) if ok and not bad and not status_errors else 0.0
    return {"frames_per_s": frames / wall, "requests_per_s": ok / wall, "latency_p50_ms": float(m.group(7)) / 1e3,
            "latency_p99_ms": float(m.group(8)) / 1e3, "ttff_p50_ms": float("nan"), "ttff_p99_ms": float("nan"),
            "gap_p50_ms": float("nan"), "gap_p99_ms": float("nan"),
            "errors": ([f"{errors} socket errors, {status_errors} non-2xx, {bad} streams not ending OK"]
                       if errors or status_errors or bad else [])}
