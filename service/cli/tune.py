"""`worldserve tune MODEL_DIR`: measure which backend x precision serves this model fastest within its quality gate on
this machine, and pin it in MODEL_DIR/serving.json (runtime/choose.py applies the pin at start-up).

Per candidate (what this machine supports: support.problem, model_problem, the features choose.needs names):
    frames/s   through the Engine (admission, steps, sampler, decode of every row: the serving path), at each row
               count of --rows (1 and a full batch by default), all candidates in interleaved rounds so that the
               load of a shared machine hits each alike; median of --rounds
    gate       the quality gate (model/quality.py: step-8 open-loop PSNR on held-out episodes of the model's world
               within 0.5 dB of fp32 eager's), through the same engine with the candidate's model
    quick      the quick gate start-up repeats (choose.quick_parity vs fp32): token agreement, frame PSNR
The pin: the candidate with the best geometric mean of frames/s over the row counts among those that pass both gates,
if it beats eager at the device default by --margin (a noisy shared machine must not flip the default on noise);
else the default itself. Every figure goes into the pin (`measured`) and is printed as a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import platform
import time
from pathlib import Path

CPU_CANDIDATES = [("eager", "fp32"), ("eager", "bf16"), ("eager", "int8"), ("compile", "fp32"), ("compile", "bf16"),
                  ("onnxruntime", "fp32")]
CUDA_CANDIDATES = [("eager", "bf16"), ("compile", "bf16"), ("eager", "fp8"), ("compile", "fp8"), ("eager", "fp32"),
                   ("eager", "int8"), ("tensorrt", "bf16")]


def candidates(ms, model, features: set[str], only: list[str] | None) -> tuple[list, list[str]]:
    """(backend, precision) pairs to measure on ms.device, and why each other one is skipped."""
    from ..runtime.choose import missing, needs
    from ..runtime.support import model_problem, problem

    cuda = ms.device.startswith("cuda")
    out, skipped = [], []
    for b, p in CUDA_CANDIDATES if cuda else CPU_CANDIDATES:
        if only and f"{b}:{p}" not in only:
            continue
        c = ms.model_copy(update={"backend": b, "precision": p})
        why = problem(c) or model_problem(model, c)
        lack = missing(needs(ms.device, b, p), features)
        if why or lack:
            skipped.append(f"{b} {p}: {why or 'this machine lacks ' + ', '.join(lack)}")
        else:
            out.append((b, p))
    return out, skipped


def _requests(spec, rows: int, horizon: int, tag: str):
    import numpy as np

    from ..messages import RolloutRequest

    rng = np.random.default_rng(0)
    # a whole window of context: every timed step attends over a full window, as a session or a long rollout does
    # in steady state (with 2 frames, horizon 4 never filled tiny's 8-frame window, and compiled bf16 timed 1.22x
    # eager bf16 at 64 rows where at full windows it is 0.84x). The same context every call: after the warm-up the
    # context cache (engine/context_cache.py) holds it, so the timed rounds are steps, not prefills
    ctx = rng.integers(0, 256, (spec.context_window, spec.height, spec.width, 3), dtype=np.uint8)  # uint8 [C, H, W, 3]
    if spec.action_dim:
        acts = rng.uniform(-1, 1, (rows, horizon, spec.action_dim)).astype(np.float32)  # [rows, T, A]
    else:
        acts = rng.integers(0, spec.n_actions, (rows, horizon)).astype(np.int64)  # [rows, T]
    return [RolloutRequest(f"{tag}-{i}", spec.name, ctx, acts[i : i + 1], seed=i, temperature=1.0)
            for i in range(rows)]


def time_engines(models: dict, rows_list: list[int], horizon: int, rounds: int, say) -> tuple[dict, dict]:
    """frames/s per (candidate, rows): each round runs `rows` one-candidate rollouts of `horizon` frames (every frame
    decoded) on every candidate's engine in turn. -> ({(key, rows): [frames/s per round]}, {(key, rows): seconds of
    the bucket's first rollout (compile traces there)})."""
    from ..engine.engine import Engine, complete
    from ..runtime.batch import Sampler
    from ..settings import EngineSettings

    out: dict = {}
    warm: dict = {}
    for rows in rows_list:
        engines = {k: Engine(m, EngineSettings(max_slots=rows, max_candidates=1, max_queue=rows), sampler=Sampler())
                   for k, m in models.items()}
        for k, e in engines.items():  # warm-up: the bucket's first step (compile traces here)
            t0 = time.perf_counter()
            complete(e, _requests(e.spec, rows, 2, "warm"))
            warm[(k, rows)] = time.perf_counter() - t0
            say(f"  warm-up {k} at {rows} rows: {warm[(k, rows)]:.1f} s")
        for r in range(rounds):
            for k, e in engines.items():
                t0 = time.perf_counter()
                complete(e, _requests(e.spec, rows, horizon, f"r{r}"))
                out.setdefault((k, rows), []).append(rows * horizon / (time.perf_counter() - t0))
    return out, warm


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def cmd_tune(a, clock) -> None:
    """clock: cli.runtime._say (timestamped progress lines, as export and quantize print them)."""
    import torch

    from ..lab.evaluate import evaluate, heldout_episodes
    from ..model.io import WEIGHTS, sha256_file
    from ..model.quality import gate_verdict, passes_gate
    from ..runtime.batch import buckets
    from ..runtime.choose import QUICK_GATE, gate_problem, machine_features, needs, quick_parity, write_pin
    from ..runtime.host_malloc import tune_malloc
    from ..runtime.loader import load_model, prepare
    from ..settings import ModelSettings, default_precision

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    say = clock(time.perf_counter())
    say(tune_malloc())  # as every engine process does (EngineSettings.tune_malloc): timed as served
    mdir = Path(a.model_dir)
    base = ModelSettings(dir=mdir, device=a.device, backend="eager", precision="fp32", warmup=False,
                         artifact_dir=Path(a.artifact_dir))
    ref = load_model(base)
    features = machine_features(a.device)
    cands, skipped = candidates(base, ref, features, a.only.split(",") if a.only else None)
    default = ("eager", default_precision(a.device))
    if default not in cands:
        cands.insert(0, default)
    for s in skipped:
        say(f"skipped {s}")
    if any(b == "compile" for b, _ in cands):
        import torch._inductor.config

        # compiled candidates start cold, as in a fresh container: with inductor's on-disk cache warm from earlier
        # runs on this machine, compile bf16's start-up read +5 s instead of the ~+110 s a first `serve` pays
        torch._inductor.config.force_disable_caches = True
    models, built_s = {}, {}
    for b, p in cands:
        t0 = time.perf_counter()
        models[(b, p)] = prepare(base.model_copy(update={"backend": b, "precision": p}))
        built_s[(b, p)] = time.perf_counter() - t0
        say(f"built {b} {p} ({built_s[(b, p)]:.1f} s)")
    rows_list = [int(r) for r in a.rows.split(",")]
    say(f"timing {len(models)} candidates at rows {rows_list}, {a.horizon} frames each, {a.rounds} interleaved rounds")
    fps, warm = time_engines(models, rows_list, a.horizon, a.rounds, say)
    # start-up: `serve` builds the model and warms every bucket up to max_slots (engine/build.py: warmup); estimated
    # as the build plus the slowest measured first rollout per bucket, beyond what the default costs
    n_buckets = len(buckets(a.max_slots))
    startup = {k: built_s[k] + n_buckets * max(warm[(k, r)] for r in rows_list) for k in models}
    env = a.env or _world(ref.spec.name)
    say(f"quality gate: {a.episodes} held-out episodes of {env!r}")
    eps = heldout_episodes(a.episodes, env=env)
    ref_eval = evaluate(ref, eps)
    table, rows_out = [], []
    for k, m in models.items():
        extra_s = startup[k] - startup[default]
        if extra_s > a.startup_budget_s:  # out already: its gate is not worth the minutes (compile traces again)
            res, gate_ok, verdict = None, False, f"not run: start-up {extra_s:+.0f} s over the default"
        else:
            res = evaluate(m, eps) if k != ("eager", "fp32") else ref_eval
            gate_ok = passes_gate(ref_eval.model_psnr, res.model_psnr)
            verdict = gate_verdict(ref_eval.model_psnr, res.model_psnr, f"{k[0]} {k[1]}")
        step8 = res.model_psnr[8] if res else float("nan")
        quick = quick_parity(ref, models.get(("eager", k[1]), m))
        quick_why = gate_problem(quick, QUICK_GATE)
        med = {r: _median(fps[(k, r)]) for r in rows_list}
        ratio = {r: med[r] / _median(fps[(default, r)]) for r in rows_list}
        geo = math.exp(sum(math.log(v) for v in ratio.values()) / len(ratio))
        row = {"backend": k[0], "precision": k[1], "frames_per_s": {str(r): round(med[r], 2) for r in rows_list},
               "startup_extra_s": round(extra_s, 1), "startup_ok": extra_s <= a.startup_budget_s,
               "vs_default": {str(r): round(ratio[r], 3) for r in rows_list}, "geomean_vs_default": round(geo, 3),
               "gate": verdict, "gate_pass": gate_ok, "psnr_step8_db": None if res is None else round(step8, 2),
               "quick": {k2: round(v, 4) for k2, v in quick.items()}, "quick_pass": quick_why is None}
        rows_out.append(row)
        table.append(f"| {k[0]} | {k[1]} | " + " | ".join(f"{med[r]:.1f} ({ratio[r]:.2f}x)" for r in rows_list) +
                     f" | {geo:.2f}x | {extra_s:+.0f} s | " +
                     (f"{'PASS' if gate_ok else 'FAIL'} ({step8:.2f} dB) | " if res else "not run (start-up) | ") +
                     (f"{100 * quick['token_agreement']:.1f}% / " if "token_agreement" in quick else "") +
                     f"{quick['frame_psnr']:.1f} dB |")
    ok = [r for r in rows_out if r["gate_pass"] and r["quick_pass"] and r["startup_ok"]]
    best = max(ok, key=lambda r: r["geomean_vs_default"], default=None)
    if best is None or best["geomean_vs_default"] < a.margin:
        win = next(r for r in rows_out if (r["backend"], r["precision"]) == default)
        why = (f"tune {datetime.date.today()}: no candidate passing the gate within the start-up budget beat eager "
               f"{default[1]} by "
               f"{a.margin:g}x (best: {best['backend']} {best['precision']} {best['geomean_vs_default']:.2f}x)"
               if best else f"tune {datetime.date.today()}: no candidate passed the gate")
    else:
        win = best
        why = (f"tune {datetime.date.today()}: {win['backend']} {win['precision']} {win['geomean_vs_default']:.2f}x "
               f"eager {default[1]}'s frames/s (geomean over rows {rows_list}), gate PASS, start-up "
               f"{win['startup_extra_s']:+.0f} s")
    header = ("| backend | precision | " + " | ".join(f"frames/s @ {r} rows" for r in rows_list) +
              " | geomean | start-up vs default | gate (step-8 PSNR) | quick gate (tokens / frames vs fp32) |\n"
              "|---|---|" + "---:|" * len(rows_list) + "---:|---:|---|---|")
    print("\n" + header + "\n" + "\n".join(table) + "\n", flush=True)
    pin = {"backend": win["backend"], "precision": win["precision"],
           "needs": needs(a.device, win["backend"], win["precision"]),
           "weights_sha256": sha256_file(mdir / WEIGHTS), "quick_gate": QUICK_GATE, "why": why,
           "measured": {"command": f"worldserve tune {a.model_dir} --device {a.device} --rows {a.rows} --horizon "
                                   f"{a.horizon} --rounds {a.rounds} --episodes {a.episodes} --threads {a.threads} "
                                   f"--startup-budget-s {a.startup_budget_s:g}",
                        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                        "machine": {"cpu": platform.processor() or platform.machine(), "features": sorted(features),
                                    "torch": torch.__version__, "threads": a.threads},
                        "env": env, "episodes": a.episodes, "skipped": skipped, "rows": rows_out}}
    if a.dry_run:
        say(f"would pin {win['backend']} {win['precision']}: {why} (--dry-run: nothing written)")
        return
    path = write_pin(mdir, a.device, pin)
    say(f"pinned {win['backend']} {win['precision']} in {path}: {why}")


def _world(name: str) -> str:
    from ..client.gym import world_of  # the shipped models' worlds, named once

    return world_of(name)


def add_command(sub, clock) -> None:
    t = sub.add_parser("tune", help="time the backend x precision candidates this machine supports, gate each, pin "
                       "the fastest that passes in MODEL_DIR/serving.json (what `serve` then chooses by default)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("model_dir")
    t.add_argument("--device", default="cpu")
    t.add_argument("--rows", default="1,32", help="row counts to time (comma-separated); the pin ranks by the "
                   "geometric mean of frames/s over them")
    t.add_argument("--horizon", type=int, default=4, help="frames per rollout in a timing round")
    t.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    t.add_argument("--episodes", type=int, default=16, help="held-out episodes for the quality gate")
    t.add_argument("--env", help="the held-out world (default: the model's own, client.gym.world_of)")
    t.add_argument("--only", help="candidates to measure, e.g. eager:fp32,eager:bf16 (default: all supported)")
    t.add_argument("--margin", type=float, default=1.1, help="a candidate must beat the device default by this "
                   "factor (geomean) to be pinned")
    t.add_argument("--startup-budget-s", type=float, default=30.0, help="most extra start-up seconds (build + "
                   "warm-up of every bucket, estimated) a candidate may cost over the default: `serve` must start fast")
    t.add_argument("--max-slots", type=int, default=64, help="the serving engine's max_slots (its buckets are warmed "
                   "up at start-up)")
    t.add_argument("--artifact-dir", default="artifacts")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--dry-run", action="store_true", help="print the table and the choice, write nothing")
    t.set_defaults(fn=functools.partial(cmd_tune, clock=clock))
