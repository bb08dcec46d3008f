"""The prepared GPU check (issue 21 item 4): everything the first minutes on a GPU should tell, in one command.

    .venv/bin/python -m bench.gpu_check --out DIR                       # CUDA, base at 64 rows, <= 6 min on an H100
    .venv/bin/python -m bench.gpu_check --out DIR --device cpu --quick  # the same phases on the CPU (tiny, ~1 min)

Each phase runs in its own subprocess with its own timeout (bench/gpu_check_phases.py), and every phase appends its
rows to DIR/results.jsonl as it measures them: a phase that hangs or is killed still leaves what it had, and the
check goes on with the next one. All phases share one budget (--budget seconds, default 330 on CUDA): a phase gets
at most what is left, so the whole check ends in time whatever happens. Phases, in order:

    env         versions (torch, CUDA, cuDNN, Triton, TensorRT, ONNX Runtime), GPU / CPU, the MFU peak used
    parity      tiny (trained) CPU vs the device; each served precision / backend vs strict fp32 on the preset:
                token agreement, max |logit diff|, decoded-frame PSNR
    invariance  batch invariance as a measured fraction: a seeded rollout alone vs among rows-1 other rows
    engine      per configuration (its own subprocess each): through the Engine at --rows rows (frames every step):
                ms/step, frames/s, MFU (vs the peak of the precision's math), GPU busy % (kernel time / step time,
                torch.profiler), syncs per step (torch.cuda.set_sync_debug_mode), engine / bare (the bare model's
                step + sampler + decode time over the engine's)
    tensorrt    one profile per graph (--rows): parity vs eager and the engine's throughput; skipped (with the
                reason) where tensorrt is not installed or the device is not CUDA

Writes DIR/results.jsonl and DIR/gpu_check.md (one markdown table) and prints the table; --report also copies it
to bench/reports/gpu_check-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = [("phase", "phase", "{}"), ("configuration", "config", "{}"), ("status", "status", "{}"),
           ("ms/step", "ms_step", "{:.2f}"), ("frames/s", "frames_s", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"),
           ("GPU busy", "gpu_busy", "{:.0%}"), ("syncs/step", "syncs_step", "{:.1f}"),
           ("engine ÷ bare", "engine_vs_bare", "{:.2f}"), ("token agreement", "token_agreement", "{:.4f}"),
           ("max logit diff", "max_logit_diff", "{:.2e}"), ("PSNR dB", "psnr_db", "{:.1f}"), ("notes", "note", "{}")]


def plan(a) -> list[tuple[list[str], float]]:
    """(arguments of one phase subprocess, its own timeout in seconds), in the order they run."""
    from bench.gpu_check_phases import served_configs

    cuda = a.device.startswith("cuda")
    engines = [(["engine", "--config", f"{b}:{p}"], (150 if b == "compile" else 75) if cuda else
                (300 if b == "compile" else 60)) for b, p in served_configs(a.device, a.quick)]
    # the goal figures first (the engine at the default bf16, eager and compiled), then parity and invariance,
    # then the other configurations; TensorRT last (optional: skipped at once where it is not installed)
    first = [e for e in engines if e[0][2] in ("eager:bf16", "compile:bf16")]
    rest = [e for e in engines if e not in first]
    return [(["env"], 60), *first, (["parity"], 120 if cuda else 90), (["invariance"], 60), *rest,
            (["tensorrt"], 150)]


def run_phases(a) -> list[dict]:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.write_text("")
    deadline = time.monotonic() + a.budget
    common = ["--device", a.device, "--preset", a.preset, "--rows", str(a.rows), "--out", str(out),
              "--artifact-dir", a.artifact_dir]
    common += (["--quick"] if a.quick else []) + (["--threads", str(a.threads)] if a.threads else [])
    for args, own in plan(a):
        name = " ".join(args)
        left = deadline - time.monotonic()
        if left < 5:
            _append(results, {"phase": args[0], "config": name, "status": "skipped: budget spent"})
            continue
        limit = min(own, left)
        before = _count(results)
        t0 = time.monotonic()
        print(f"[gpu_check] {name} (timeout {limit:.0f} s)", flush=True)
        # its own process group: a timeout kills the phase with whatever it started (inductor's compile workers)
        p = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--phase", *args, *common], cwd=HERE.parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = p.communicate(timeout=limit)
            status = "ok" if p.returncode == 0 else f"failed (rc {p.returncode})"
            tail = (stderr or stdout).strip().splitlines()[-1:] if p.returncode else []
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            status, tail = f"timeout after {limit:.0f} s", (stderr or stdout).strip().splitlines()[-1:]
        if status != "ok" or _count(results) == before:  # killed or failed: say so next to whatever it left
            _append(results, {"phase": args[0], "config": name, "status": status,
                              "note": " ".join(tail)[-200:].replace("|", "/")})
        print(f"[gpu_check] {name}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or v == "":
        return ""
    try:
        return fmt.format(v).replace("|", "/")
    except (ValueError, TypeError):
        return str(v).replace("|", "/")


PHASE_ORDER = ("env", "parity", "invariance", "engine", "tensorrt")


def table(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: PHASE_ORDER.index(r["phase"]) if r["phase"] in PHASE_ORDER else 99)
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.jsonl and gpu_check.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny preset, 8 rows, few steps (the CPU check in make test)")
    p.add_argument("--preset", help="default: base (tiny with --quick)")
    p.add_argument("--rows", type=int, help="engine rows (default 64; 8 with --quick)")
    p.add_argument("--budget", type=float, help="seconds for all phases (default 330 on CUDA, 170 on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per phase (0: torch's default)")
    p.add_argument("--artifact-dir", default=str(HERE.parent / "artifacts"), help="TensorRT / ONNX build cache")
    p.add_argument("--report", action="store_true", help="also write bench/reports/gpu_check-<device>.md")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase (a subprocess of the check)
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.preset = a.preset or ("tiny" if a.quick else "base")
    a.rows = a.rows or (8 if a.quick else 64)
    a.budget = a.budget or (330.0 if a.device.startswith("cuda") else 170.0)
    if a.phase:
        from bench.gpu_check_phases import run_phase

        run_phase(a)
        return
    t0 = time.monotonic()
    rows = run_phases(a)
    env = next((r.get("note", "") for r in rows if r["phase"] == "env" and r.get("status") == "ok"), "")
    md = "\n".join([f"# GPU check ({a.device}{', quick' if a.quick else ''})", "",
                    f"Command: `python -m bench.gpu_check --out {a.out} --device {a.device}"
                    f"{' --quick' if a.quick else ''}` — preset {a.preset}, {a.rows} rows, "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - t0:.0f} s.", "",
                    f"Environment: {env}", "", table(rows), ""])
    (Path(a.out) / "gpu_check.md").write_text(md)
    if a.report:
        dev = a.device.split(":")[0] + ("-quick" if a.quick else "")
        (HERE / "reports" / f"gpu_check-{dev}.md").write_text(md)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
