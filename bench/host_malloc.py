"""The engine with and without glibc's malloc tuned for its temporaries (runtime/host_malloc.py), one run.

    .venv/bin/python -m bench.host_malloc [--rows 64] [--seconds 8] [--pairs 2] [--precisions bf16,fp32]

Each measurement is a fresh process (malloc's thresholds are process-wide and glibc moves them by itself as blocks
are freed, so the two cannot share one): the engine built as `serve` builds it (engine/build.build_engine, with
EngineSettings.tune_malloc on or off), stepping in a thread as in an engine process, `--rows` W2 requests kept in
flight (bench/context_cache.Loop: K=1, H=16, 4 context frames, a frame every step), one untimed round, then
`--seconds` timed. Reports frames/s, the minor page faults per engine step and the process's peak RSS; tuned and
untuned alternate (`--pairs`, order swapped every pair) so drift of a shared machine hits both alike.
Written to bench/reports/host_malloc.md.

    .venv/bin/python -m bench.host_malloc --child 1 --rows 16 --seconds 2     # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(tune: bool, rows: int, seconds: float, precision: str | None, model_dir: str, preset: str | None) -> dict:
    """One measurement in this process: -> frames_per_s, faults_per_step, steps, peak_rss_mb."""
    import torch

    from bench.context_cache import Loop
    from bench.load import context_frames
    from worldserve.engine.build import build_engine
    from worldserve.settings import EngineSettings, ModelSettings, Settings

    torch.set_num_threads(1)
    model = {"preset": preset} if preset else {"dir": Path(model_dir)}
    model["warmup"] = False
    if precision:
        model.update(backend="eager", precision=precision)
    s = Settings(model=ModelSettings(**model), engine=EngineSettings(max_slots=rows, tune_malloc=tune))
    engine, _ = build_engine(s)
    out: dict = {}

    def work() -> None:  # the engine steps in a thread of its process (engine/process.py)
        loop = Loop(engine, "W2", False, rows, context_frames(8)[-4:])
        loop.run(0.1)
        loop.drain()  # one untimed round: admission, the first windows
        steps = 0
        orig = engine.step

        def counted():
            nonlocal steps
            steps += 1
            return orig()

        engine.step = counted
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        frames = loop.run(seconds)
        wall = time.perf_counter() - t0
        out.update(frames_per_s=frames / wall, steps=steps,
                   faults_per_step=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / max(steps, 1))
        loop.drain()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(tune: bool, rows: int, seconds: float, precision: str | None = None, model_dir: str | None = None,
            preset: str | None = None, timeout: float | None = None) -> dict:
    """One measurement (`child`) in a fresh process -> its figures; RuntimeError with its stderr if it fails."""
    cmd = [sys.executable, "-m", "bench.host_malloc", "--child", str(int(tune)), "--rows", str(rows),
           "--seconds", str(seconds)]
    cmd += ["--precision", precision] if precision else []
    cmd += ["--model-dir", model_dir] if model_dir else []
    cmd += ["--preset", preset] if preset else []
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", type=int, choices=[0, 1], default=None, help="one measurement (tuned: 1), JSON out")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--precisions", default="bf16,fp32", help="bf16: the tiny model's pin on this CPU; fp32: the "
                   "peers' precision")
    p.add_argument("--precision", default=None, help="(--child) eager at this precision; default: the pin")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "tiny"))
    p.add_argument("--preset", default=None, help="a random-weight preset (base, large) instead of --model-dir")
    p.add_argument("--out", default=None, help="default: bench/reports/host_malloc[-PRESET].md")
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(bool(a.child), a.rows, a.seconds, a.precision, a.model_dir, a.preset)))
        return
    out = a.out or str(ROOT / "bench" / "reports" / f"host_malloc{'-' + a.preset if a.preset else ''}.md")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows_md = []
    for prec in a.precisions.split(","):
        got: dict[bool, list[dict]] = {False: [], True: []}
        for i in range(a.pairs):
            for tune in ((False, True) if i % 2 == 0 else (True, False)):
                got[tune].append(measure(tune, a.rows, a.seconds, prec, a.model_dir, a.preset))
                print(prec, "tuned" if tune else "glibc default", got[tune][-1], flush=True)
        med = {t: {k: statistics.median(m[k] for m in got[t]) for k in got[t][0]} for t in got}
        rows_md.append(f"| {prec} | {med[False]['frames_per_s']:.0f} | {med[True]['frames_per_s']:.0f} | "
                       f"**{med[True]['frames_per_s'] / med[False]['frames_per_s']:.2f}** | "
                       f"{med[False]['faults_per_step']:.0f} | {med[True]['faults_per_step']:.0f} | "
                       f"{med[False]['peak_rss_mb']:.0f} | {med[True]['peak_rss_mb']:.0f} |")
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    cmd = "python -m bench.host_malloc " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# The engine with glibc's malloc tuned for its temporaries (runtime/host_malloc.py) vs glibc's defaults", "",
        f"`{cmd.strip()}` ({started}, {platform.machine()}, load average {load} at the end; one torch thread; "
        f"each figure the median of {a.pairs} fresh processes, tuned and untuned alternating).", "",
        f"{'The ' + a.preset + ' preset (random weights)' if a.preset else 'The bundled tiny model'}, "
        f"the engine as `serve` builds it (engine/build.py), {a.rows} W2 requests in flight (K=1, H=16, 4 context "
        f"frames, a frame every step), {a.seconds:g} s timed after one untimed round.", "",
        "| precision | glibc default frames/s | tuned frames/s | tuned ÷ default | minor faults / step, default | "
        "tuned | peak RSS MB, default | tuned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *rows_md, ""])
    Path(out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
