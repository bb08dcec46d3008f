"""Per-event cost of the REST / WebSocket stream, before and after the lean encoding (one run, ratios).

    python -m bench.rest_events [--n 3000]

Server: json.dumps(event_json(ev)) (the frame's base64 run through the JSON encoder) vs event_bytes (spliced in).
Client: httpx's iter_lines (text decoding per line) + json.loads vs the client's bytes lines (client._ndjson).
A 64x64 frame, encodings raw and png. Writes bench/reports/rest_events.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worldserve.api.schemas import event_bytes, event_json  # noqa: E402
from worldserve.client.client import _ndjson  # noqa: E402
from worldserve.lab.data.minigrid_env import Simulator  # noqa: E402
from worldserve.messages import RolloutEvent  # noqa: E402


def per_call_us(fn, n: int) -> float:
    best = float("inf")
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    a = ap.parse_args()
    frame = Simulator(seed=77).frame()  # a real frame: uint8 [64, 64, 3]
    ev = RolloutEvent("r", 0, 3, 0.0, 0.02, frame=frame, confidence=0.97)
    rows = []
    for enc in ("raw", "png"):
        old = per_call_us(lambda e=enc: (json.dumps(event_json(ev, e)) + "\n").encode(), a.n)
        new = per_call_us(lambda e=enc: event_bytes(ev, e) + b"\n", a.n)
        body = (event_bytes(ev, enc) + b"\n") * 16  # one H=16 rollout's stream
        lines = a.n // 16

        def old_client(b=body):
            return [json.loads(ln) for ln in httpx.Response(200, content=b).iter_lines() if ln]

        def new_client(b=body):
            return [json.loads(ln) for ln in _ndjson(httpx.Response(200, content=b))]

        assert old_client() == new_client()
        oc, nc = per_call_us(old_client, lines) / 16, per_call_us(new_client, lines) / 16
        rows.append((enc, len(body) // 16, old, new, oc, nc))
    out = ["# REST event encoding: per-event cost, before / after (one run)", "",
           f"`python -m bench.rest_events` (best of 3 x {a.n} events, one thread, a real 64x64 frame).", "",
           "| frame encoding | line bytes | server: json.dumps(event_json) us | server: event_bytes us | ratio | "
           "client: iter_lines + loads us | client: bytes lines + loads us | ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for enc, size, old, new, oc, nc in rows:
        out.append(f"| {enc} | {size} | {old:.1f} | {new:.1f} | {old / new:.2f}x | {oc:.1f} | {nc:.1f} | "
                   f"{oc / nc:.2f}x |")
    text = "\n".join(out) + "\n"
    print(text)
    (ROOT / "bench" / "reports" / "rest_events.md").write_text(text)


if __name__ == "__main__":
    main()
