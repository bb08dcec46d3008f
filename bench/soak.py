"""Soak: the real server under steady load for a long time; RSS and open slots must stay flat.

    python -m bench.soak --minutes 20 --load 0.7

1. Capacity: C gRPC clients loop latent-only rollouts (K candidates x H steps) for --probe-s seconds against a
   `worldserve serve` subprocess (tiny, --max-slots S): the saturated rate in requests/s.
2. Soak: the same clients, each pacing itself so that together they offer --load x capacity, for --minutes; a
   mix of rollouts, predicts with frames and short WebSocket sessions (a planner and players). Every 10 s: the
   server's RSS (from /proc), its active slots and queue depth (/metrics), requests done and failed.
3. Verdict: RSS growth from the first to the last quarter, slots back to 0 after the load stops, no failure.
Writes bench/reports/soak.md and soak.csv and prints them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import MODEL_DIR, metric_value, start_server  # noqa: E402
from worldserve.client.client import GrpcClient, RestClient  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    """C clients; each does one unit of work, then sleeps so that the clients together offer `rate` req/s."""

    def __init__(self, srv, clients: int, k: int, h: int, frames: np.ndarray):
        self.srv, self.clients, self.k, self.h, self.frames = srv, clients, k, h, frames
        self.done = self.failed = 0
        self.lock = threading.Lock()

    def work(self, i: int, g: GrpcClient, rest: RestClient, n: int) -> None:
        rng = np.random.default_rng(i * 1_000_003 + n)
        kind = n % 10
        if kind < 7:  # a planner tick: K candidates, latent only
            cands = rng.integers(0, 3, (self.k, self.h)).tolist()
            list(g.rollout("tiny", self.frames[:2], cands, frames="none", seed=int(rng.integers(1 << 30))))
        elif kind < 9:  # a predict with frames
            g.predict("tiny", self.frames[:1], rng.integers(0, 3, 4).tolist())
        else:  # a player: a short WebSocket session
            with rest.session("tiny", self.frames[:1]) as s:
                for a in rng.integers(0, 3, 5).tolist():
                    s.step(int(a))

    def run(self, seconds: float, rate: float | None) -> None:
        stop = time.time() + seconds

        def client(i):
            g, rest, n = GrpcClient(self.srv.grpc), RestClient(self.srv.http), 0
            period = None if rate is None else self.clients / rate
            while time.time() < stop:
                t0 = time.time()
                try:
                    self.work(i, g, rest, n)
                    with self.lock:
                        self.done += 1
                except Exception as e:  # noqa: BLE001 - counted and reported: a soak must not fail at all
                    with self.lock:
                        self.failed += 1
                    print(f"client {i}: {type(e).__name__}: {e}", flush=True)
                n += 1
                if period is not None:
                    time.sleep(max(0.0, period - (time.time() - t0)))
            g.close()
            rest.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--load", type=float, default=0.7)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--max-slots", type=int, default=32)
    p.add_argument("--probe-s", type=float, default=30)
    a = p.parse_args()
    from worldserve.lab.data.minigrid_env import Simulator

    sim = Simulator(seed=5)
    frames = np.stack([sim.frame(), sim.step(2)[0]])
    tmp = Path("/tmp/worldserve-soak")
    tmp.mkdir(exist_ok=True)
    srv = start_server(tmp, "--model-dir", str(MODEL_DIR), "--max-slots", str(a.max_slots))
    try:
        probe = Load(srv, a.clients, a.candidates, a.horizon, frames)
        t0 = time.time()
        probe.run(a.probe_s, None)
        capacity = probe.done / (time.time() - t0)
        rate = a.load * capacity
        print(f"capacity {capacity:.2f} req/s; soak at {rate:.2f} req/s for {a.minutes} min", flush=True)
        load = Load(srv, a.clients, a.candidates, a.horizon, frames)
        worker = threading.Thread(target=load.run, args=(a.minutes * 60, rate))
        rows, start = [], time.time()
        worker.start()
        while worker.is_alive():
            time.sleep(10)
            rows.append((time.time() - start, rss_mb(srv.proc.pid), metric_value(srv.http, "worldserve_active_slots"),
                         metric_value(srv.http, "worldserve_queue_depth"), load.done, load.failed))
            t, r, sl, qd, d, f = rows[-1]
            print(f"t={t:5.0f}s rss={r:7.1f} MB slots={sl:3.0f} queue={qd:3.0f} done={d:6d} failed={f}", flush=True)
        time.sleep(3)
        slots_after = metric_value(srv.http, "worldserve_active_slots")
        rss_after = rss_mb(srv.proc.pid)
    finally:
        srv.stop()
    q = max(1, len(rows) // 4)
    first, last = statistics.mean(r[1] for r in rows[:q]), statistics.mean(r[1] for r in rows[-q:])
    growth = (last - first) / first
    mean_slots = statistics.mean(r[2] for r in rows)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "soak.csv").write_text("t_s,rss_mb,active_slots,queue_depth,done,failed\n" + "".join(
        f"{t:.0f},{r:.1f},{s:.0f},{qd:.0f},{d},{f}\n" for t, r, s, qd, d, f in rows))
    verdict = "flat" if growth < 0.05 and slots_after == 0 and load.failed == 0 else "NOT flat"
    text = f"""# Soak ({time.strftime('%Y-%m-%d')})

`python -m bench.soak --minutes {a.minutes:g} --load {a.load:g} --clients {a.clients} --candidates {a.candidates}
--horizon {a.horizon} --max-slots {a.max_slots}`: `worldserve serve` (tiny, CPU), a mix of latent-only rollouts
(70 %), predicts with frames (20 %) and 5-step WebSocket sessions (10 %), paced to {a.load:.0%} of the capacity
measured first ({capacity:.2f} requests/s saturated, {a.probe_s:g} s). Samples every 10 s in soak.csv.

| figure | value |
|---|---|
| requests done / failed | {load.done} / {load.failed} |
| server RSS, first quarter -> last quarter (mean) | {first:.1f} -> {last:.1f} MB ({growth:+.1%}) |
| server RSS after the load | {rss_after:.1f} MB |
| active slots, mean during the load / after it | {mean_slots:.1f} / {slots_after:.0f} |
| verdict (RSS growth < 5 %, slots back to 0, no failure) | {verdict} |
"""
    (REPORTS / "soak.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
