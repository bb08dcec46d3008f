"""Load generator: served vs raw engine loop, in one run.

    python -m bench.load --preset-dir models/tiny --clients 1,8,64 --horizon 16 --candidates 4 --mode local
    python -m bench.load --quick                                   # a short smoke run
    python -m bench.load --with-base ...                           # then the same for the `base` preset:
        # engine frame time vs bare model.step at batch 16, served vs raw at 16 clients (16 slots)

For each client count N it runs N concurrent gRPC (and HTTP) clients doing rollouts of H steps with K
candidates against the real server (a subprocess), and reports frames/s (candidate-steps per second),
time to first frame and inter-frame p50/p99; then the same model and batch shape through the raw engine
loop in this process (no server, no queue) as the ceiling. Also: stack overhead at 1 client
(served inter-frame time minus the raw step time) and the fork speedup (K=64 in one request vs 64
separate requests), and the engine's frame time vs the bare `model.step` at --engine-batch rows
(bench/load_engine.py). Writes bench/out/load-<tag>.json and .md (+ .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peer_clients import run_clients  # noqa: E402
from bench.wrk_load import wrk_served  # noqa: E402
from tests.conftest import MODEL_DIR, start_redis, start_server, start_stack  # noqa: E402
from worldserve.client.client import GrpcClient, RestClient  # noqa: E402


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of one process, all its threads (Linux /proc)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


class CpuShare:
    """Cores used during a served chunk by the server's front end, its engine processes (children) and this load
    generator (its client threads): where the CPU of a 2-core box goes (the raw loop has no front end, no client)."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def sample(self) -> dict:
        t = os.times()  # + the load generators this process ran and waited for (wrk)
        return {"t": time.perf_counter(), "front": proc_cpu_s(self.pid),
                "engine": sum(proc_cpu_s(c) for c in children(self.pid)),
                "client": proc_cpu_s(os.getpid()) + t.children_user + t.children_system}

    @staticmethod
    def cores(a: dict, b: dict) -> dict:
        wall = b["t"] - a["t"]
        return {f"{k}_cores": (b[k] - a[k]) / wall for k in ("front", "engine", "client")}


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def context_frames(n: int = 2):
    from worldserve.lab.data.minigrid_env import Simulator

    sim = Simulator(seed=77)
    frames = [sim.frame()]
    for i in range(n - 1):
        frames.append(sim.step((2, 1, 2, 0)[i % 4])[0])
    return np.stack(frames)


def served(target: str, transport: str, model: str, n: int, k: int, h: int, duration: float, frames: str,
           actions, encoding: str | None = None):
    """N clients looping rollouts for `duration` seconds. Returns frames/s, ttff, inter-frame gaps.
    encoding: the frames' encoding both ways (context and predicted), None: each client's defaults (REST png, gRPC
    raw)."""
    enc = {} if encoding is None else {"frame_encoding": encoding}
    ctx = context_frames()
    ttff, gaps, counts, errors = [], [], [0] * n, []
    stop = time.time() + duration

    def client(i):
        ce = {} if encoding is None else {"context_encoding": encoding}
        c = GrpcClient(target, **ce) if transport == "grpc" else RestClient(target, **ce)
        cands = [actions(i, j) for j in range(k)]
        while time.time() < stop:
            t0 = time.perf_counter()
            last = None
            try:
                for _ in c.rollout(model, ctx, cands, frames=frames, seed=i, **enc):
                    now = time.perf_counter()
                    if last is None:
                        ttff.append(now - t0)
                    else:
                        gaps.append(now - last)
                    last = now
                    counts[i] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return

    wall = run_clients(client, n)
    # inter-frame gap per *step*: events of the K candidates of one step arrive together
    return summary(counts, wall, ttff, [g for g in gaps if g > 1e-4] if k > 1 else gaps, errors)


def summary(counts: list[int], wall: float, ttff: list[float], gaps: list[float], errors: list[str]) -> dict:
    return {"frames_per_s": sum(counts) / wall, "ttff_p50_ms": 1e3 * pct(ttff, 50), "ttff_p99_ms": 1e3 * pct(ttff, 99),
            "gap_p50_ms": 1e3 * pct(gaps, 50), "gap_p99_ms": 1e3 * pct(gaps, 99), "errors": errors[:3]}


def serving_model(model_dir, preset):
    """What `serve` serves, in this process for the raw loops: the model directory's pin (backend x precision) or the
    device default; 1 torch thread as the server (OMP_NUM_THREADS=1: 2 threads thrash on a shared 2-core box)."""
    import torch

    from worldserve.runtime.host_malloc import tune_malloc
    from worldserve.runtime.loader import prepare
    from worldserve.settings import ModelSettings

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    print(tune_malloc(), flush=True)  # as build_engine does in every engine process (EngineSettings.tune_malloc)
    ms = ModelSettings(preset=preset) if preset else ModelSettings(dir=Path(model_dir))
    model = prepare(ms)
    print(f"raw engine: {ms.backend} {ms.precision} (as `serve` chooses)", flush=True)
    return model


def raw_engine(model_dir, preset, n: int, k: int, h: int, duration: float, frames: str, actions, max_slots: int):
    """Same model, same batch composition, no server: the ceiling."""

    from worldserve.engine.engine import Engine
    from worldserve.messages import FrameMode, RolloutRequest
    from worldserve.settings import EngineSettings

    model = serving_model(model_dir, preset)
    events = []
    eng = Engine(model, EngineSettings(max_slots=max_slots, max_queue=4 * n))
    ctx = context_frames()
    mode = {"all": FrameMode.ALL, "last": FrameMode.LAST, "none": FrameMode.NONE}[frames]
    # warm-up, untimed (the server warmed its buckets at start-up): one admission of n requests + 2 steps
    for i in range(n):
        eng.submit(RolloutRequest(f"warm-{i}", model.cfg.name, ctx,
                                  np.asarray([actions(i, j) for j in range(k)])[:, :2], frames=mode, seed=i))
    while sum(e.final for e in events) < n:
        events.extend(eng.step())
    events.clear()
    step_times, done_frames = [], 0
    t_end = time.time() + duration
    t0 = time.time()
    r = 0
    while time.time() < t_end:
        for i in range(n):
            eng.submit(RolloutRequest(f"raw{r}-{i}", model.cfg.name, ctx, np.asarray([actions(i, j) for j in range(k)]),
                                      frames=mode, seed=i))
        r += 1
        finals = 0
        while finals < n:
            events.clear()
            s0 = time.perf_counter()
            events.extend(eng.step())
            step_times.append(time.perf_counter() - s0)
            finals += sum(e.final for e in events)
            done_frames += sum(not e.final for e in events)
    wall = time.time() - t0
    return {"frames_per_s": done_frames / wall, "step_p50_ms": 1e3 * pct(step_times, 50),
            "step_p99_ms": 1e3 * pct(step_times, 99)}


def served_sessions(target: str, model: str, n: int, duration: float, actions):
    """N WebSocket sessions, each stepping one action at a time with a frame each step (a player, W4's shape)."""
    ctx = context_frames()
    ttff, gaps, counts, errors = [], [], [0] * n, []
    stop = time.time() + duration

    def client(i):
        try:
            with RestClient(target).session(model, ctx, frames="all", seed=i) as s:
                acts, t = actions(i, 0), 0
                while time.time() < stop:
                    t0 = time.perf_counter()
                    s.step(acts[t % len(acts)])
                    (gaps if t else ttff).append(time.perf_counter() - t0)
                    counts[i] += 1
                    t += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    return summary(counts, run_clients(client, n), ttff, gaps, errors)


def raw_sessions(model_dir, preset, n: int, duration: float, actions, max_slots: int):
    """The sessions' ceiling: N sessions in the engine loop of this process, every session acting each step."""
    from worldserve.engine.engine import Engine
    from worldserve.engine.scheduler import headroom
    from worldserve.messages import FrameMode, RolloutRequest, SessionAction
    from worldserve.settings import EngineSettings

    if n > max_slots - headroom(max_slots):  # the rest would wait for a slot forever (sessions never end here)
        raise SystemExit(f"{n} sessions: at most {max_slots - headroom(max_slots)} fit in {max_slots} slots")
    model = serving_model(model_dir, preset)
    eng = Engine(model, EngineSettings(max_slots=max_slots, max_queue=4 * n))
    ctx = context_frames()
    empty = np.zeros((1, 0, model.spec.action_dim), np.float32) if model.spec.action_dim else np.zeros((1, 0), np.int64)
    for i in range(n):
        eng.submit(RolloutRequest(f"s{i}", model.cfg.name, ctx, empty, frames=FrameMode.ALL, seed=i, session=True))
    step_times, frames, t = [], 0, 0

    def one_round(t):
        for i in range(n):
            acts = actions(i, 0)
            eng.act(SessionAction(f"s{i}", np.asarray(acts[t % len(acts)])))
        got = 0
        while got < n:
            s0 = time.perf_counter()
            got += sum(not e.final for e in eng.step())
            step_times.append(time.perf_counter() - s0)
        return got

    for t in range(2):  # warm-up (admission, first steps), untimed
        one_round(t)
    step_times.clear()
    t_end, t0 = time.time() + duration, time.time()
    while time.time() < t_end:
        t += 1
        frames += one_round(t)
    wall = time.time() - t0
    for i in range(n):
        eng.cancel(f"s{i}")
    return {"frames_per_s": frames / wall, "step_p50_ms": 1e3 * pct(step_times, 50),
            "step_p99_ms": 1e3 * pct(step_times, 99)}


def mean_of(parts: list[dict]) -> dict:
    """Mean of the numeric fields of repeated chunks of one point (errors: concatenated)."""
    out = {k: float(np.mean([p[k] for p in parts])) for k, v in parts[0].items() if isinstance(v, float | int)}
    if "errors" in parts[0]:
        out["errors"] = [e for p in parts for e in p["errors"]][:3]
    return out


def fork_speedup(target: str, model: str, h: int, k: int = 64):
    """A planner's tick: a full context window, short horizon, latent only: prefill dominates."""
    g = GrpcClient(target)
    ctx = context_frames(next(m.context_window for m in g.models() if m.name == model))
    cands = [[j % 3] * h for j in range(k)]
    list(g.rollout(model, ctx, cands[:2], frames="none"))  # warm
    t0 = time.perf_counter()
    list(g.rollout(model, ctx, cands, frames="none"))
    fork = time.perf_counter() - t0
    errs = []

    def one(j):
        try:
            list(GrpcClient(target).rollout(model, ctx, [cands[j]], frames="none"))
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    separate = run_clients(one, k)  # the K requests at once, each from its own thread
    return {"fork_s": fork, "separate_s": separate, "speedup": separate / fork, "errors": len(errs)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default=str(MODEL_DIR))
    p.add_argument("--preset", default=None, help="random-weight preset instead of the model dir (e.g. base)")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--candidates", type=int, default=1)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--frames", default="all", choices=["all", "last", "none"])
    p.add_argument("--transports", default="grpc,http", help="grpc,http (rollouts), http-wrk (the same REST "
                   "rollouts from wrk, a C load generator: bench/wrk_load.py) and ws (sessions: one action at a time, "
                   "a frame each; raw: the same sessions in the engine loop)")
    p.add_argument("--modes", default="local", help="local (serve's defaults), inproc (engine.isolated off), "
                   "isolated (on), redis")
    p.add_argument("--encoding", default=None, choices=["raw", "png", "jpeg"],
                   help="frames both ways (context and predicted) for every transport (default: each client's own: "
                   "REST png, gRPC raw)")
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="alternate raw and served chunks this many times")
    p.add_argument("--tag", default=None)
    p.add_argument("--engine-batch", type=int, default=16, help="engine frame vs bare model.step (0: skip)")
    p.add_argument("--engine-steps", type=int, default=10)
    p.add_argument("--legacy-sampler", default=None, metavar="REV",
                   help="also time the engine with the sampler of commit REV (before/after in one run)")
    p.add_argument("--with-base", action="store_true", help="then the base preset: 16 clients, 16 slots")
    p.add_argument("--base-duration", type=float, default=60.0)
    p.add_argument("--base-horizon", type=int, default=16, help="long enough that slots stay full between rounds")
    p.add_argument("--base-engine-steps", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.clients, a.duration, a.horizon, a.transports, a.engine_steps = "1,4", 2.0, 4, "grpc", 3
    run(a)
    if a.with_base:
        b = argparse.Namespace(**vars(a))
        b.preset, b.clients, b.candidates, b.modes, b.max_slots, b.tag = "base", "16", 1, "local", 16, None
        b.horizon, b.duration, b.engine_steps, b.engine_batch = a.base_horizon, a.base_duration, a.base_engine_steps, 16
        run(b)


def engine_section(a, out: Path) -> tuple[list[dict], list[str]]:
    """Engine frame time vs bare model.step at a.engine_batch rows: latent only at T=0 and T=1, frames at T=0."""
    import torch

    from bench.load_engine import engine_vs_step, legacy_sampler
    from worldserve.model.config import PRESETS
    from worldserve.model.io import load_model_dir
    from worldserve.model.world_model import build

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    model = build(PRESETS[a.preset]) if a.preset else load_model_dir(a.model_dir)
    ctx = context_frames()
    cases = [("none", 0.0, "current", None), ("none", 1.0, "current", None), ("all", 0.0, "current", None)]
    if a.legacy_sampler:
        cases.append(("none", 0.0, a.legacy_sampler, legacy_sampler(a.legacy_sampler)))
    rows = []
    for frames, temp, label, sampler in cases:
        r = {**engine_vs_step(model, ctx, a.engine_batch, a.engine_steps, frames, temp, sampler), "sampler": label}
        rows.append(r)
        print("engine", json.dumps(r), flush=True)
    md = ["", f"Engine frame time vs bare model.step, batch {a.engine_batch}, median of {a.engine_steps} steps "
          "(timed alternately in one process, 1 thread; bare = model.step, + decode when frames are returned):", "",
          "| frames | temperature | sampler | engine step ms | bare ms | bare / engine | overhead ms |",
          "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['frames']} | {r['temperature']:g} | {r['sampler']} | {r['engine_ms']:.1f} | "
                  f"{r['bare_ms']:.1f} | {r['efficiency']:.2f} | {r['overhead_ms']:.1f} |")
    return rows, md


def run(a) -> None:
    tag = a.tag or (a.preset or Path(a.model_dir).name)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "logs"
    tmp.mkdir(exist_ok=True)
    engine_rows, engine_md = engine_section(a, out) if a.engine_batch else ([], [])
    model_args = ("--preset", a.preset) if a.preset else ("--model-dir", a.model_dir)
    continuous = a.preset == "base"

    def actions(i, j):
        rng = np.random.default_rng(1000 * i + j)
        if continuous:
            return rng.uniform(-1, 1, (a.horizon, 4)).round(3).tolist()
        return rng.integers(0, 3, a.horizon).tolist()

    rows, report = [], {"args": vars(a), "results": []}
    for mode in a.modes.split(","):
        redis = None
        if mode in ("local", "inproc", "isolated"):  # `serve`: its defaults, engines in-process, in their own
            key = "WORLDSERVE_ENGINE__ISOLATED"
            iso = {"inproc": {key: "false"}, "isolated": {key: "true"}}
            srv = start_server(tmp, *model_args, "--max-slots", str(a.max_slots), "--max-queue", "1024",
                               env=iso.get(mode))
        else:
            redis = start_redis(tmp)
            srv = start_stack(tmp, redis, 1, (*model_args, "--max-slots", str(a.max_slots), "--max-queue", "1024"),
                              api_env={"WORLDSERVE_QUEUE__STREAM_MAXLEN": "4096"})
        model = a.preset or GrpcClient(srv.grpc).models()[0].name  # the served model's own name
        cpu = CpuShare(srv.proc.pid) if redis is None else None
        try:
            for n in [int(x) for x in a.clients.split(",")]:
                if n * a.candidates > a.max_slots:
                    continue
                serv = {tr: [] for tr in a.transports.split(",")}
                raws: dict[str, list] = {"rollout": [], "session": []}
                d = a.duration / a.repeats
                for _ in range(a.repeats):  # raw and served alternate: drift of a shared machine hits both
                    if set(serv) - {"ws"}:
                        raws["rollout"].append(raw_engine(a.model_dir, a.preset, n, a.candidates, a.horizon, d,
                                                          a.frames, actions, a.max_slots))
                    if "ws" in serv:
                        raws["session"].append(raw_sessions(a.model_dir, a.preset, n, d, actions, a.max_slots))
                    for tr in serv:
                        c0 = cpu.sample() if cpu else None
                        if tr == "ws":
                            serv[tr].append(served_sessions(srv.http, model, n, d, actions))
                        elif tr == "http-wrk":  # bench/wrk_load.py: the same requests from a C load generator
                            serv[tr].append(wrk_served(srv.http, model, n, a.candidates, a.horizon, d, a.frames,
                                                       actions, context_frames(), a.encoding or "png"))
                        else:
                            serv[tr].append(served(srv.grpc if tr == "grpc" else srv.http, tr, model, n,
                                                   a.candidates, a.horizon, d, a.frames, actions, a.encoding))
                        if cpu:
                            serv[tr][-1].update(CpuShare.cores(c0, cpu.sample()))
                for tr in serv:
                    raw = mean_of(raws["session" if tr == "ws" else "rollout"])
                    s = mean_of(serv[tr])
                    row = {"mode": mode, "transport": tr, "clients": n, "K": a.candidates, "H": a.horizon, **s,
                           "raw_frames_per_s": raw["frames_per_s"], "raw_step_p50_ms": raw["step_p50_ms"],
                           "raw_step_p99_ms": raw["step_p99_ms"],
                           "served_over_raw": s["frames_per_s"] / raw["frames_per_s"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            if mode == "local" and not a.quick and a.max_slots >= 64:
                report["fork"] = fork_speedup(srv.grpc, model, 4)
                print("fork", json.dumps(report["fork"]), flush=True)
        finally:
            srv.stop()
            if redis:
                redis.stop()
    report["results"] = rows
    report["engine"] = engine_rows
    report["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / f"load-{tag}.json").write_text(json.dumps(report, indent=2))
    md = [f"### {tag}: K={a.candidates}, H={a.horizon}, frames={a.frames}, {a.duration:.0f}s per point, encoding "
          f"{a.encoding or 'the clients defaults (REST png, gRPC raw)'}"
          + (f" (raw and served alternating in {a.repeats} chunks, figures averaged)" if a.repeats > 1 else ""),
          "", "| mode | transport | clients | served frames/s | raw frames/s | served/raw | TTFF p50/p99 ms | "
          "inter-frame p50/p99 ms | raw step p50/p99 ms | overhead p50/p99 ms | cores: front end / engines / "
          "load generator |", "|" + "---|" * 11]
    for r in rows:
        md.append(f"| {r['mode']} | {r['transport']} | {r['clients']} | {r['frames_per_s']:.0f} | "
                  f"{r['raw_frames_per_s']:.0f} | {r['served_over_raw']:.2f} | {r['ttff_p50_ms']:.1f} / "
                  f"{r['ttff_p99_ms']:.1f} | {r['gap_p50_ms']:.2f} / {r['gap_p99_ms']:.2f} | "
                  f"{r['raw_step_p50_ms']:.2f} / {r['raw_step_p99_ms']:.2f} | "
                  f"{r['gap_p50_ms'] - r['raw_step_p50_ms']:.2f} / {r['gap_p99_ms'] - r['raw_step_p99_ms']:.2f} | "
                  + (f"{r['front_cores']:.2f} / {r['engine_cores']:.2f} / {r['client_cores']:.2f} |"
                     if "front_cores" in r else "- |"))
    if "fork" in report:
        f = report["fork"]
        md += ["", f"Fork (a full context window, H=4, latent only): K=64 in one request {f['fork_s']:.3f}s "
               f"vs 64 separate requests {f['separate_s']:.3f}s -> {f['speedup']:.2f}x"]
    md += engine_md
    (out / f"load-{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for (mode, tr) in sorted({(r["mode"], r["transport"]) for r in rows}):
            pts = [r for r in rows if r["mode"] == mode and r["transport"] == tr]
            ax.plot([r["clients"] for r in pts], [r["frames_per_s"] for r in pts], "o-", label=f"{mode}/{tr}")
        raw_pts = {r["clients"]: r["raw_frames_per_s"] for r in rows}
        ax.plot(list(raw_pts), list(raw_pts.values()), "k--", label="raw engine")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("frames/s")
        ax.set_title(tag)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"load-{tag}.png", dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
