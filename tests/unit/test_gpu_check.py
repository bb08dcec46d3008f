"""bench/gpu_check.py --device cpu --quick (issue 21 item 4): the prepared GPU check's phases run on the CPU as
subprocesses, each appends its rows, and the one table at the end has a row for every phase. Also: a phase that
outlives its timeout is killed and reported next to what it left."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("env", "parity", "invariance", "engine", "tensorrt")


def test_quick_cpu_check_has_a_row_for_every_phase(tmp_path):
    out = tmp_path / "check"
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--device", "cpu", "--quick",
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    md = (out / "gpu_check.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]  # data rows, header dropped
    for phase in PHASES:
        assert any(line.startswith(f"| {phase} |") for line in table), f"no {phase} row:\n{md}"
    ok = {r["phase"] for r in rows if r["status"] == "ok"}
    assert {"env", "parity", "invariance", "engine"} <= ok, rows  # measured, not only reported
    engine = [r for r in rows if r["phase"] == "engine" and r["status"] == "ok"]
    assert {r["config"].split(" @")[0] for r in engine} == {"tiny eager fp32", "tiny eager bf16", "tiny eager int8"}
    for r in engine:
        assert r["ms_step"] > 0 and r["frames_s"] > 0 and 0 < r["mfu"] < 1 and r["engine_vs_bare"] > 0
    parity = [r for r in rows if r["phase"] == "parity"]
    assert parity[0]["token_agreement"] == 1.0  # CPU fp32 vs itself on the CPU
    assert all(r["token_agreement"] >= 0.9 for r in parity), parity
    inv = [r for r in rows if r["phase"] == "invariance"]
    assert all(r["token_agreement"] == 1.0 for r in inv), inv  # the CPU path is batch-invariant (fixed chunks)
    trt = next(r for r in rows if r["phase"] == "tensorrt")
    assert trt["status"] == "skipped" and "tensorrt" in trt["note"]


def test_a_phase_past_its_budget_is_reported(tmp_path):
    """The budget bounds the whole check: what cannot start is listed as skipped, not silently dropped."""
    out = tmp_path / "check"
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--device", "cpu", "--quick",
                        "--budget", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["status"].startswith(("skipped", "timeout")) for r in rows), rows
    assert {r["phase"] for r in rows} == set(PHASES)


def test_a_phase_that_outlives_its_timeout_is_killed_and_reported(tmp_path, monkeypatch):
    """A phase past its own timeout is killed (its process group) and reported; the check goes on."""
    import argparse

    import bench.gpu_check as gc

    monkeypatch.setattr(gc, "plan", lambda a: [(["env"], 0.3), (["tensorrt"], 120)])
    rows = gc.run_phases(argparse.Namespace(out=str(tmp_path), budget=150, device="cpu", preset="tiny", rows=8,
                                            artifact_dir=str(tmp_path / "art"), quick=True, threads=1))
    assert rows[0]["phase"] == "env" and rows[0]["status"].startswith("timeout"), rows
    assert rows[1]["phase"] == "tensorrt" and rows[1]["status"] == "skipped", rows
