"""worldserve vs a generic serving framework (LitServe, bench/peer_litserve.py), same model, same run.

    .venv/bin/python -m bench.peer_bench                                  # tiny (models/tiny), ~5 min
    .venv/bin/python -m bench.peer_bench --preset base --planner 16x4 --planner-clients 1,2 \
        --player-clients 1,4 --player-steps 4 --duration 20 --max-slots 16       # base, random weights
    .venv/bin/python -m bench.peer_bench --quick                          # smoke run

Starts worldserve (`worldserve serve`, embedded mode: in-process queue; gRPC and REST/WebSocket) and the
LitServe peer as subprocesses (1 torch thread each), checks that both return the same greedy frames for
the same input, then for every workload x client count runs each system in turn (interleaved, so drift
of a shared machine hits all alike):
  planner  K candidates x H steps, latent only (rewards + done), 4 context frames; latency = request
  player   a session of single steps with a frame each step; latency = per step
Writes bench/reports/peer-<tag>.md and bench/out/peer-<tag>.json. ours / peer > 1 for frames/s is
better; ours / peer < 1 for p99 latency is better.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import context_frames  # noqa: E402
from bench.peer_clients import SYSTEMS, Player, Workload, make_client, merge, rollout, run_point  # noqa: E402
from tests.conftest import MODEL_DIR, free_port, start_server  # noqa: E402


class Peer:
    """A peer server as a subprocess: "litserve" (bench/peer_litserve.py) or "ray" (bench/peer_rayserve.py)."""

    def __init__(self, log: Path, model_args: tuple[str, ...], max_batch: int, batch_timeout: float,
                 kind: str = "litserve", malloc: bool = False):
        self.port, self.kind = free_port(), kind
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if malloc:  # glibc's malloc set as worldserve's engine process sets its own (runtime/host_malloc.py)
            from worldserve.runtime.host_malloc import glibc_tunables

            env["GLIBC_TUNABLES"] = glibc_tunables()
        module = {"litserve": "bench.peer_litserve", "ray": "bench.peer_rayserve"}[kind]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *model_args, "--port", str(self.port),
             "--max-batch-size", str(max_batch), "--batch-timeout", str(batch_timeout)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)  # noqa: SIM115
        t0 = time.time()
        while time.time() - t0 < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("peer not healthy after 300 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own process group: LitServe's API server and worker processes
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.kind == "ray":  # Ray's own daemons (GCS, raylet) outlive the driver's process group
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def model_facts(a) -> dict:
    from worldserve.model.config import PRESETS
    from worldserve.model.io import load_config

    cfg = PRESETS[a.preset] if a.preset else load_config(Path(a.model_dir))
    return {"name": cfg.name, "window": cfg.window, "n_actions": cfg.n_actions, "action_dim": cfg.action_dim}


def correctness(targets: dict, model: str, ctx, window: int, actions) -> dict:
    """Same greedy input to every system: planner rollout (K=2, H=6, frames every step) and a 6-step player."""
    cands = [actions(0, j, 6) for j in range(2)]
    got = {}
    for s in targets:
        c = make_client(s, targets[s])
        try:
            r, d, fr = rollout(s, c, model, ctx[-4:], cands, "all")
            p = Player(s, c, model, ctx[-1], window)
            try:
                play = [p.step(x) for x in actions(1, 0, 6)]
            finally:
                p.close()
        finally:
            c.close()
        got[s] = (r, d, np.stack([fr[(j, t)] for j in range(2) for t in range(6)]), np.stack(play))
    out = {}
    ref = got["peer-http"]
    for s in targets:
        if s == "peer-http":
            continue
        r, d, fr, play = got[s]
        out[s] = {"rollout_frames_equal": f"{int((fr == ref[2]).all(axis=(1, 2, 3)).sum())}/{len(fr)}",
                  "rollout_pixels_equal": float((fr == ref[2]).mean()),
                  "reward_max_abs_diff": float(np.abs(r - ref[0]).max()),
                  "done_max_abs_diff": float(np.abs(d - ref[1]).max()),
                  "player_frames_equal": f"{int((play == ref[3]).all(axis=(1, 2, 3)).sum())}/{len(play)}"}
    return out


def ratio_rows(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["workload"], r["clients"]) for r in rows}, key=lambda k: ([r["workload"] for r in rows].index(
        k[0]), k[1]))
    for wl, n in keys:
        by = {r["system"]: r for r in rows if r["workload"] == wl and r["clients"] == n}
        for ps in ("peer-http", "peer-ray", "peer-b1"):
            peer = by.get(ps)
            for s in ("ours-grpc", "ours-rest"):
                if s in by and peer:
                    out.append({"workload": wl, "clients": n, "ours": s, "peer": ps,
                                "throughput_ratio": by[s]["frames_per_s"] / peer["frames_per_s"],
                                "p99_ratio": by[s]["lat_p99_ms"] / peer["lat_p99_ms"],
                                "p50_ratio": by[s]["lat_p50_ms"] / peer["lat_p50_ms"]})
    return out


def summary(rows: list[dict]) -> list[str]:
    """ours / the better peer configuration of each point (highest frames/s; lowest p99, taken separately)."""
    md = ["| workload | clients | gRPC frames/s | gRPC p99 | REST frames/s | REST p99 |",
          "|---|---:|---:|---:|---:|---:|"]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        for n in sorted({r["clients"] for r in rows if r["workload"] == wl}):
            by = {r["system"]: r for r in rows if r["workload"] == wl and r["clients"] == n}
            peers = [r for s, r in by.items() if s.startswith("peer")]
            if not peers:
                continue
            thr, p99 = max(p["frames_per_s"] for p in peers), min(p["lat_p99_ms"] for p in peers)
            cells = []
            for s in ("ours-grpc", "ours-rest"):
                r = by.get(s)
                cells += [f"{r['frames_per_s'] / thr:.2f}", f"{r['lat_p99_ms'] / p99:.2f}"] if r else ["", ""]
            md.append(f"| {wl} | {n} | " + " | ".join(cells) + " |")
    return md


def report(tag: str, a, facts: dict, check: dict, rows: list[dict], ratios: list[dict], meta: dict) -> str:
    ray = (f" Ray Serve {meta['ray']} (peer-ray): the same model code and contract, one replica, @serve.batch with the "
           "same batch size and timeout." if meta.get("ray") else "")
    md = [f"## worldserve vs LitServe{' and Ray Serve' if ray else ''} peers — {tag}", "",
          f"Measured {meta['time']} UTC, commit {meta['commit']}, {meta['cores']} cores shared with other agents "
          f"(load average at start {meta['load_start']:.2f}, at end {meta['load_end']:.2f}); one run, systems "
          f"interleaved per point ({a.rounds} rounds, order rotated, samples pooled): read the ratios, not the "
          "absolute numbers.", "",
          f"Command: `{meta['command']}`", "",
          f"worldserve: `worldserve serve` (embedded queue, engine in its own process), --max-slots {a.max_slots}"
          f"{' ' + a.ours_args if a.ours_args else ''}, 1 torch thread. "
          f"Peer: LitServe {meta['litserve']}, 1 worker, max_batch_size={a.peer_max_batch}, "
          f"batch_timeout={a.peer_batch_timeout}s (peer-b1: batching off), 1 torch thread, JSON + base64 PNG"
          f"{', malloc tuned as ours (--peer-malloc: GLIBC_TUNABLES)' if a.peer_malloc else ''}.{ray} "
          "Same weights "
          f"({facts['name']}), greedy (argmax) unless T is given.", "",
          "### Same greedy output (peer as reference)", "",
          "| system | rollout frames equal | pixels equal | reward max diff | done max diff | player frames equal |",
          "|---|---|---:|---:|---:|---|"]
    for s, c in check.items():
        md.append(f"| {s} | {c['rollout_frames_equal']} | {c['rollout_pixels_equal']:.4f} | "
                  f"{c['reward_max_abs_diff']:.2e} | {c['done_max_abs_diff']:.2e} | {c['player_frames_equal']} |")
    md += ["", "### Summary: ours ÷ the better peer configuration (frames/s: > 1 is better; p99: < 1 is better)", "",
           *summary(rows)]
    md += ["", "### Figures", "",
           "| workload | clients | system | frames/s | latency p50 ms | latency p99 ms | samples | errors |",
           "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['workload']} | {r['clients']} | {r['system']} | {r['frames_per_s']:.1f} | "
                  f"{r['lat_p50_ms']:.1f} | {r['lat_p99_ms']:.1f} | {r['samples']} | {len(r['errors'])} |")
    md += ["", "### ours ÷ peer (throughput: > 1 is better; latency: < 1 is better)", "",
           "| workload | clients | ours via | vs | frames/s ratio | p50 ratio | p99 ratio |",
           "|---|---:|---|---|---:|---:|---:|"]
    for r in ratios:
        md.append(f"| {r['workload']} | {r['clients']} | {r['ours']} | {r['peer']} | {r['throughput_ratio']:.2f} | "
                  f"{r['p50_ratio']:.2f} | {r['p99_ratio']:.2f} |")
    errs = [e for r in rows for e in r["errors"]]
    if errs:
        md += ["", "Errors (first of each point): " + "; ".join(sorted(set(errs))[:5])]
    return "\n".join(md) + "\n"


def _ray_version() -> str:
    import ray

    return ray.__version__


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(MODEL_DIR))
    p.add_argument("--preset", default=None, help="random-weight preset instead of the model dir (e.g. base)")
    p.add_argument("--planner", default="16x8,64x16", help="KxH planner workloads")
    p.add_argument("--planner-clients", default="1,2,4", help="(points with clients x K > 2 x slots skipped)")
    p.add_argument("--planner-temperature", type=float, default=0.0, help="> 0: also a sampled planner workload")
    p.add_argument("--player-clients", default="1,8,32")
    p.add_argument("--player-steps", type=int, default=16)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per point (clients finish their loop)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per point, systems rotated; figures pooled")
    p.add_argument("--min-iters", type=int, default=2, help="requests / sessions per client at least")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--peer-max-batch", type=int, default=16)
    p.add_argument("--peer-batch-timeout", type=float, default=0.01)
    p.add_argument("--peer-unbatched", action="store_true", help="also the peer with batching off (peer-b1)")
    p.add_argument("--peer-malloc", action="store_true", help="give the peers glibc's malloc set as worldserve's "
                   "engine sets its own (runtime/host_malloc.py, via GLIBC_TUNABLES): what a peer's user would get "
                   "by setting that variable")
    p.add_argument("--ray", action="store_true", help="also Ray Serve as a peer (peer-ray; pip install 'ray[serve]')")
    p.add_argument("--suite", choices=["issue20"], default=None,
                   help="issue20: the five workloads W1-W5 at their client counts (replaces --planner/--player-*)")
    p.add_argument("--tag", default=None)
    p.add_argument("--ours-args", default="", help="extra `serve` flags for ours, e.g. '--backend eager --precision "
                   "fp32' (the peers' precision); default: serve's own choice (the model's pin)")
    p.add_argument("--only", default=None, help="with --suite: only these workloads, e.g. W2,W3")
    p.add_argument("--distinct-contexts", action="store_true", help="every planner request a context of its own (no "
                   "two share a prefill: worldserve's context cache never hits); default: the same last observations")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rerender", metavar="JSON", help="only rewrite the report from a saved bench/out/peer-*.json")
    a = p.parse_args(argv)
    if a.rerender:
        d = json.loads(Path(a.rerender).read_text())
        ra = argparse.Namespace(**d["args"])
        tag = ra.tag or (ra.preset or Path(ra.model_dir).name)
        md = report(tag, ra, d.get("facts", {"name": tag}), d["check"], d["rows"], d["ratios"], d["meta"])
        (ROOT / "bench" / "reports" / f"peer-{tag}.md").write_text(md)
        print(md)
        return
    if a.quick:
        a.planner, a.planner_clients, a.player_clients, a.player_steps, a.duration, a.min_iters = \
            "8x4", "1,2", "1,2", 4, 1.0, 1
    facts = model_facts(a)
    tag = a.tag or (a.preset or Path(a.model_dir).name)
    model, window = facts["name"], facts["window"]

    def actions(i: int, j: int, h: int):
        rng = np.random.default_rng([i, j])
        if facts["action_dim"]:
            return rng.uniform(-1, 1, (h, facts["action_dim"])).round(3).tolist()
        return rng.integers(0, facts["n_actions"], h).tolist()

    out = ROOT / "bench" / "out"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model_args = ("--preset", a.preset) if a.preset else ("--model-dir", a.model_dir)
    systems = a.systems.split(",")
    workloads = [(Workload("planner", *map(int, kh.split("x"))), a.planner_clients) for kh in a.planner.split(",")]
    if a.planner_temperature > 0:
        k, h = map(int, a.planner.split(",")[0].split("x"))
        workloads.append((Workload("planner", k, h, temperature=a.planner_temperature), a.planner_clients))
    workloads.append((Workload("player", h=a.player_steps, frames="all"), a.player_clients))
    if a.suite == "issue20":  # issue 20's table: what planners, players and RL users send
        workloads = [
            (Workload("planner", 1, 16, h_min=4, tag="W1"), "64"),  # many users, mixed horizons, latent only
            (Workload("planner", 1, 16, frames="all", tag="W2"), "64"),  # raw frames every step
            (Workload("planner", 32, 12, tag="W3"), "4"),  # an MPC tick: K=32 candidates
            (Workload("player", h=a.player_steps, frames="all", tag="W4"), "32"),  # players, one action a time
            (Workload("cem", 64, 16, stop_on_done=True, tag="W5"), "8"),  # the real CEM planner's iterations
        ]
        if a.only:
            workloads = [w for w in workloads if w[0].tag in a.only.split(",")]
    if a.distinct_contexts:
        workloads = [(dataclasses.replace(w, distinct_contexts=True), n) for w, n in workloads]
    ctx = context_frames(8)
    load_start = os.getloadavg()[0]
    srv = start_server(logs, *model_args, "--max-slots", str(a.max_slots), "--max-queue", "1024", *a.ours_args.split())
    peers = []
    try:
        peers.append(Peer(logs / f"peer-{tag}.log", model_args, a.peer_max_batch, a.peer_batch_timeout,
                          malloc=a.peer_malloc))
        targets = {"ours-grpc": srv.grpc, "ours-rest": srv.http, "peer-http": peers[0].url}
        if a.ray:
            peers.append(Peer(logs / f"peer-ray-{tag}.log", model_args, a.peer_max_batch, a.peer_batch_timeout,
                              kind="ray", malloc=a.peer_malloc))
            targets["peer-ray"] = peers[-1].url
            systems.append("peer-ray")
        if a.peer_unbatched:
            peers.append(Peer(logs / f"peer-b1-{tag}.log", model_args, 1, 0.0))
            targets["peer-b1"] = peers[-1].url
            systems.append("peer-b1")
        targets = {s: t for s, t in targets.items() if s in systems or s == "peer-http"}
        check = correctness(targets, model, ctx, window, actions)
        print("same greedy output:", json.dumps(check), flush=True)
        rows = []
        for w, clients in workloads:
            for n in [int(x) for x in clients.split(",")]:
                if not a.suite and w.name == "planner" and n * w.k > 2 * a.max_slots:  # a point within minutes
                    continue
                got: dict[str, list] = {s: [] for s in systems}
                for rnd in range(a.rounds):  # systems in a rotated order each round
                    for s in systems[rnd % len(systems):] + systems[: rnd % len(systems)]:
                        got[s].append(run_point(s, targets[s], model, w, n, a.duration, a.min_iters, ctx, actions,
                                                window))
                for s in systems:
                    r = merge(got[s])
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        srv.stop()
        for pr in peers:
            pr.stop()
    import litserve

    meta = {"time": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cores": os.cpu_count(),
            "load_start": load_start, "load_end": os.getloadavg()[0], "litserve": litserve.__version__,
            "ray": _ray_version() if a.ray else None,
            "command": "python -m bench.peer_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip()}
    ratios = ratio_rows(rows)
    saved = {"meta": meta, "args": vars(a), "facts": facts, "check": check, "rows": rows, "ratios": ratios}
    (out / f"peer-{tag}.json").write_text(json.dumps(saved, indent=2) + "\n")
    md = report(tag, a, facts, check, rows, ratios, meta)
    reports = ROOT / "bench" / "reports"
    reports.mkdir(exist_ok=True)
    (reports / f"peer-{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
