"""Clients and workloads for bench/peer_bench.py: the same planner / player work sent to worldserve
(gRPC, REST + WebSocket) and to the LitServe peer (bench/peer_litserve.py, HTTP JSON).

Every workload is a closed loop of N clients for `duration` seconds (each client also finishes at least
`min_iters` iterations); it returns frames/s (candidate-steps delivered per second of wall time) and the
latency percentiles of what that user waits for: a planner the whole rollout (request latency), a
player each step (action in -> frame out).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np

from bench.peer_litserve import from_png_b64, png_b64
from worldserve.client.client import GrpcClient, RestClient
from worldserve.client.client import plain as _plain

# peer-http: LitServe (bench/peer_litserve.py); peer-ray: Ray Serve (bench/peer_rayserve.py), the same model code
# and HTTP contract; + "peer-b1": LitServe without batching
SYSTEMS = ("ours-grpc", "ours-rest", "peer-http")


class PeerClient:
    """What a user of the LitServe endpoint writes: one JSON POST per call."""

    def __init__(self, base_url: str, timeout: float = 600.0):
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def predict(self, context, candidates, context_actions=None, frames="all", temperature=0.0, seed=0) -> dict:
        body = {"context": [png_b64(np.asarray(f, np.uint8)) for f in context], "candidates": _plain(candidates),
                "context_actions": _plain(context_actions), "frames": frames, "temperature": temperature,
                "seed": seed}
        r = self.http.post("/predict", json=body)
        r.raise_for_status()
        d = r.json()
        d["frames"] = [[from_png_b64(s) for s in cand] for cand in d["frames"]]
        return d


def make_client(system: str, target: str):
    if system == "ours-grpc":
        return GrpcClient(target)
    if system == "ours-rest":
        return RestClient(target)
    return PeerClient(target)


def rollout(system: str, c, model: str, ctx, cands, frames: str, seed: int = 0, temperature: float = 0.0,
            stop_on_done: bool = False):
    """One planner request. Returns (rewards [K, H], dones [K, H], frames {(k, t): uint8 [H, W, 3]}).
    stop_on_done: worldserve stops a candidate's rows at a predicted episode end (the peers compute every step;
    a planner's score ignores the steps after an end either way)."""
    k, h = len(cands), len(cands[0])
    rew, done, fr = np.zeros((k, h)), np.zeros((k, h)), {}
    if system.startswith("peer"):
        d = c.predict(ctx, cands, frames=frames, temperature=temperature, seed=seed)
        steps = {"all": range(h), "last": [h - 1], "none": []}[frames]
        for j in range(k):
            for i, t in enumerate(steps):
                fr[(j, t)] = d["frames"][j][i]
        return np.asarray(d["rewards"]), np.asarray(d["dones"]), fr
    for ev in c.rollout(model, ctx, cands, frames=frames, seed=seed, temperature=temperature,
                        stop_on_done=stop_on_done):
        rew[ev.candidate, ev.step], done[ev.candidate, ev.step] = ev.reward, ev.done
        if ev.frame is not None:
            fr[(ev.candidate, ev.step)] = ev.frame
    return rew, done, fr


class Player:
    """A person playing: one observation, then one action at a time, a frame back for each.

    worldserve: a Session (gRPC bidi / WebSocket). Peer: a one-step /predict whose context is the last
    `window` frames seen (observation + predictions) with the actions between them.
    """

    def __init__(self, system: str, c, model: str, obs: np.ndarray, window: int):
        self.system, self.c, self.model, self.window = system, c, model, window
        self.frames, self.actions = [obs], []
        self.sess = None
        if not system.startswith("peer"):
            self.sess = c.session(model, obs[None]).__enter__()

    def step(self, action) -> np.ndarray:
        if self.sess is not None:
            f = self.sess.step(action).frame
        else:
            ctx = self.frames[-self.window:]
            ca = self.actions[len(self.actions) - len(ctx) + 1:] if len(ctx) > 1 else None
            f = self.c.predict(ctx, [[action]], context_actions=ca, frames="all")["frames"][0][0]
        self.frames.append(f)
        self.actions.append(action)
        return f

    def close(self) -> None:
        if self.sess is not None:
            self.sess.__exit__(None, None, None)


def run_clients(client, n: int) -> float:
    """client(i) for i in range(n), each in its own thread, all started then joined: -> wall seconds."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.time() - t0


@dataclass
class Workload:
    name: str  # "planner" | "player" | "cem" (the real CEM planner's successive iterations, lab/plan.py)
    k: int = 1  # candidates (planner, cem)
    h: int = 8  # horizon (planner, cem) or steps per session (player)
    context: int = 4  # context frames a planner sends
    frames: str = "none"
    temperature: float = 0.0
    h_min: int = 0  # > 0: each request's horizon drawn uniformly from h_min..h (mixed horizons)
    stop_on_done: bool = False  # worldserve only: stop a candidate at its predicted end
    # every request's context differs (one pixel set from the client and the iteration): no two requests share a
    # prefill, so worldserve's context cache (engine/context_cache.py) never hits; off: every planner sends the
    # same last observations (a CEM tick's iterations, many users at one start state)
    distinct_contexts: bool = False
    tag: str = ""  # e.g. "W1"

    @property
    def label(self) -> str:
        pre = f"{self.tag} " if self.tag else ""
        if self.name == "player":
            return f"{pre}player: session of {self.h} single steps, frame each step"
        t = f", T={self.temperature:g}" if self.temperature else ""
        h = f"{self.h_min}-{self.h} mixed" if self.h_min else f"{self.h}"
        stop = ", stop at done" if self.stop_on_done else ""
        stop += ", distinct contexts" if self.distinct_contexts else ""
        kind = "CEM planner ticks" if self.name == "cem" else "planner"
        return f"{pre}{kind}: K={self.k} x H={h}, {self.context} context frames, frames={self.frames}{t}{stop}"


def run_point(system: str, target: str, model: str, w: Workload, n: int, duration: float, min_iters: int,
              ctx: np.ndarray, actions, window: int) -> dict:
    """N closed-loop clients of workload w against one system. actions(i, j, h) -> an action sequence."""
    lat, counts, errors = [], [0] * n, []
    stop = time.time() + duration

    def client(i):
        c = make_client(system, target)
        it = 0
        rng = np.random.default_rng(i)
        cem = None
        if w.name == "cem":
            from worldserve.lab.plan import CEMPlanner, PlanConfig, score

            cfg = PlanConfig(candidates=w.k, horizon=w.h, seed=i)
            cem = CEMPlanner(cfg, seed=i)
        try:
            while time.time() < stop or it < min_iters:
                if w.name in ("planner", "cem"):
                    h = int(rng.integers(w.h_min, w.h + 1)) if w.h_min else w.h
                    cands = (cem.propose().tolist() if cem is not None
                             else [actions(i, it * 1000 + j, h) for j in range(w.k)])
                    req_ctx = ctx[-w.context:]
                    if w.distinct_contexts:
                        req_ctx = req_ctx.copy()
                        req_ctx[0, 0, 0] = (i, it % 256, (it // 256) % 256)
                    t0 = time.perf_counter()
                    rew, done, _ = rollout(system, c, model, req_ctx, cands, w.frames, seed=i,
                                           temperature=w.temperature, stop_on_done=w.stop_on_done)
                    lat.append(time.perf_counter() - t0)
                    if cem is not None:  # the planner's next iteration depends on this one's answer
                        cem.update(np.asarray(cands), score(rew, done, cfg))
                    counts[i] += w.k * h
                else:
                    p = Player(system, c, model, ctx[-1], window)
                    try:
                        for a in actions(i, it, w.h):
                            t0 = time.perf_counter()
                            p.step(a)
                            lat.append(time.perf_counter() - t0)
                            counts[i] += 1
                    finally:
                        p.close()
                it += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e)[:300])
        finally:
            c.close()

    wall = run_clients(client, n)
    ms = 1e3 * np.asarray(lat) if lat else np.asarray([np.nan])
    return {"system": system, "workload": w.label, "kind": w.name, "clients": n, "frames_per_s": sum(counts) / wall,
            "lat_p50_ms": float(np.percentile(ms, 50)), "lat_p99_ms": float(np.percentile(ms, 99)),
            "samples": len(lat), "wall_s": wall, "errors": errors[:3], "frames": sum(counts), "lat_ms": list(ms)}


def merge(points: list[dict]) -> dict:
    """Pool the rounds of one point: frames / total wall, percentiles over every latency sample."""
    ms = np.concatenate([p["lat_ms"] for p in points])
    frames, wall = sum(p["frames"] for p in points), sum(p["wall_s"] for p in points)
    return {**{k: v for k, v in points[0].items() if k != "lat_ms"}, "frames_per_s": frames / wall,
            "lat_p50_ms": float(np.nanpercentile(ms, 50)), "lat_p99_ms": float(np.nanpercentile(ms, 99)),
            "samples": int(np.isfinite(ms).sum()), "wall_s": wall, "frames": frames, "rounds": len(points),
            "round_frames_per_s": [p["frames_per_s"] for p in points],
            "errors": [e for p in points for e in p["errors"]]}
