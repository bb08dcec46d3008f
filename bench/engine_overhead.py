"""Where an engine step's time goes, outside the model: host overhead and the sampler's share.

    .venv/bin/python -m bench.engine_overhead [--rows 64] [--presets tiny base] [--batches 16 64] [--ab REV]

1. Host overhead: the engine with the model's compute removed (a model whose step / decode return preallocated
   outputs), `Engine.step()` at --rows active rows: scheduling, the packed inputs, sampling of a 16-entry
   vocabulary, the frames' confidence, the one device->host copy, event building and the one emit per step.
   Target (issue 21): <= 0.5 ms per step at 64 rows (greedy rows; at temperature 1 the sampler's own draws for
   rows x 64 tokens are added and shown apart). --ab REV: the same figures for the engine at git revision REV and
   for the working tree, in alternating subprocesses (--rounds of each, the fastest kept): before / after in one
   run, on a machine whose load moves between runs.
2. Sampler share: on each preset (random weights at the preset's scale), the bare `model.step` at each batch vs
   the engine's sampler over its logits at temperature 0 and 1, and the share sampling takes of step + sampling;
   likewise the frames' confidence (sampling.token_confidence, a log-softmax over the logits).
   Target: <= 5 % on `base` at batch 16 and 64.
One thread (torch.set_num_threads(1)); every figure of a table comes from one run. Written to
bench/reports/engine_overhead.md and printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.sampling import token_confidence
from worldserve.model.world_model import build, spec_from_config
from worldserve.runtime.batch import Sampler
from worldserve.settings import EngineSettings

REPORT = Path(__file__).resolve().parent / "reports" / "engine_overhead.md"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [(FrameMode.NONE, 0.0), (FrameMode.NONE, 1.0), (FrameMode.ALL, 0.0), (FrameMode.ALL, 1.0)]


class NullModel:
    """The engine-facing model surface with no compute: every output is preallocated (host-overhead bench only)."""

    def __init__(self, slots: int, n_tokens: int = 64, vocab: int = 16):
        cfg = dataclasses.replace(PRESETS["tiny"], codebook_size=vocab)
        self.spec = spec_from_config(cfg)
        self.real = build(dataclasses.replace(cfg, d_model=8, n_layers=1, n_heads=1, window=2), seed=0)
        self.logits = torch.zeros(slots, n_tokens, vocab)  # [S, N, V]
        self.reward, self.done = torch.zeros(slots), torch.zeros(slots)
        self.frame = torch.zeros(8, cfg.height, cfg.width, 3, dtype=torch.uint8)  # one decode chunk
        self.tokens = torch.zeros(8, n_tokens, dtype=torch.int64)

    device = torch.device("cpu")

    def allocate_state(self, slots):
        return self.real.allocate_state(slots)

    def fork(self, state, src, dst):
        self.real.fork(state, src, dst)

    def advance(self, state, slots, tokens):
        self.real.advance(state, slots, tokens)

    def unknown_actions(self, batch, count, device=None):
        return self.real.unknown_actions(batch, count, device)

    def encode(self, frames):
        return self.tokens[: frames.shape[0]]

    def decode(self, tokens):
        return self.frame[: tokens.shape[0]]

    def prefill(self, cache, slots, tokens, actions, known=None):
        return None

    def step(self, cache, slots, actions, known=None):
        b = slots.shape[0]
        return self.logits[:b], self.reward[:b], self.done[:b]


def host_overhead(rows: int, frames: FrameMode, temperature: float, steps: int = 200) -> float:
    """ms per engine step at `rows` active rows, model compute removed."""
    model = NullModel(rows + 1)
    eng = Engine(model, EngineSettings(max_slots=rows, max_queue=4))
    ctx = np.zeros((1, 64, 64, 3), np.uint8)
    eng.submit(RolloutRequest("r", "tiny", ctx, np.zeros((rows, steps + 20), np.int64), frames=frames,
                              temperature=temperature))
    for _ in range(10):  # admit + warm
        eng.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    return (time.perf_counter() - t0) / steps * 1e3


def tree_at(rev: str) -> Path:
    """service/ and bench/ at git revision `rev`, importable as `worldserve` from <dir>/pkgs (PYTHONPATH first)."""
    d = Path(tempfile.mkdtemp(prefix="engine_overhead_"))
    tar = subprocess.run(["git", "archive", rev, "service", "bench"], capture_output=True, check=True, cwd=ROOT).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(d, filter="data")
    (d / "pkgs").mkdir()
    (d / "pkgs" / "worldserve").symlink_to(d / "service")
    return d


def host_in(tree: Path | None, rows: int) -> list[float]:
    """host_overhead for CONFIGS in a fresh process, with the engine of `tree` (None: the working tree)."""
    code = ("import json, torch; torch.set_num_threads(1); import bench.engine_overhead as eo; "
            "from worldserve.messages import FrameMode as F; "
            f"print(json.dumps([eo.host_overhead({rows}, F[m], t) for m, t in {[(m.name, t) for m, t in CONFIGS]}]))")
    env = {**os.environ, "PYTHONPATH": f"{tree}/pkgs:{tree}" if tree else str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree or ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ab(rev: str, rows: int, rounds: int) -> list[str]:
    tree = tree_at(rev)
    before, after = [], []
    for _ in range(rounds):  # alternating: the machine's load hits both alike
        before.append(host_in(tree, rows))
        after.append(host_in(None, rows))
    lines = ["", f"## Host overhead, {rev} vs the working tree (alternating processes, fastest of {rounds})", "",
             f"| rows | frames | temperature | {rev} ms | now ms | now / {rev} |", "|---|---|---|---|---|---|"]
    for i, (fm, t) in enumerate(CONFIGS):
        b, a = min(r[i] for r in before), min(r[i] for r in after)
        lines.append(f"| {rows} | {fm.name.lower()} | {t:g} | {b:.3f} | {a:.3f} | {a / b:.2f} |")
        print(lines[-1], flush=True)
    return lines


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def sampler_at(rev: str):
    """The `sample` function of service/model/sampling.py at git revision `rev` (before/after in one run)."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:service/model/sampling.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "sampling_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sampling_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.sample


def sampler_share(preset: str, batch: int, reps: int, before=None) -> dict:
    model = build(PRESETS[preset], seed=0)
    cache = model.allocate_cache(batch)
    slots = torch.arange(batch)
    spec = model.spec
    acts = torch.zeros(batch, spec.action_dim) if spec.action_dim else torch.zeros(batch, dtype=torch.int64)
    with torch.no_grad():
        step_ms = _median_ms(lambda: model.step(cache, slots, acts), reps)
        logits = model.step(cache, slots, acts)[0]
    z = torch.zeros(batch, dtype=torch.int64)
    sampler = Sampler()
    row = {"preset": preset, "batch": batch, "vocab": spec.vocab_size, "step_ms": step_ms,
           "argmax_ms": _median_ms(lambda: logits.argmax(-1), reps)}
    for t in (0.0, 1.0):
        ms = _median_ms(lambda t=t: sampler(logits, torch.full((batch,), t), torch.arange(batch), z, z), reps)
        row[f"t{t:g}_ms"] = ms
        row[f"t{t:g}_share"] = ms / (step_ms + ms)
        if before is not None:
            ms = _median_ms(lambda t=t: before(logits, torch.full((batch,), t), torch.arange(batch), z, z),
                            max(1, reps // 2))
            row[f"before_t{t:g}_ms"] = ms
            row[f"before_t{t:g}_share"] = ms / (step_ms + ms)
    tok = logits.argmax(-1)
    row["conf_ms"] = _median_ms(lambda: token_confidence(logits, tok, torch.ones(batch)), reps)
    row["conf_share"] = row["conf_ms"] / (step_ms + row["conf_ms"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--before", default="", help="also time the sampler of this git revision (e.g. 73ad6a3)")
    p.add_argument("--ab", default="", help="also the host overhead of the engine at this git revision, alternating")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    before = sampler_at(a.before) if a.before else None
    torch.set_num_threads(1)
    lines = ["# Engine overhead (one run, one thread)", "",
             f"Command: `python -m bench.engine_overhead --rows {a.rows} --presets {' '.join(a.presets)} "
             f"--batches {' '.join(map(str, a.batches))} --reps {a.reps}"
             + (f" --before {a.before}" if a.before else "") + (f" --ab {a.ab} --rounds {a.rounds}" if a.ab else "")
             + f"` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "## Host overhead per engine step, model compute removed", "",
             "Temperature 0: greedy rows (argmax of a 16-entry vocabulary). Temperature 1: the sampler draws for",
             "rows x 64 tokens, its own cost at a tiny vocabulary.", "",
             "| rows | frames | temperature | ms / step |", "|---|---|---|---|"]
    for fm, t in CONFIGS:
        ms = host_overhead(a.rows, fm, t)
        lines.append(f"| {a.rows} | {fm.name.lower()} | {t:g} | {ms:.3f} |")
        print(lines[-1], flush=True)
    if a.ab:
        lines += ab(a.ab, a.rows, a.rounds)
    lines += ["", "## Sampler vs bare model step", "",
              "| preset | batch | vocab | step ms | argmax ms | sampler t=0 ms | share | sampler t=1 ms | share | "
              "confidence ms | share |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in a.presets:
        for b in a.batches:
            r = sampler_share(preset, b, a.reps, before)
            lines.append(f"| {preset} | {b} | {r['vocab']} | {r['step_ms']:.1f} | {r['argmax_ms']:.1f} | "
                         f"{r['t0_ms']:.1f} | {r['t0_share']:.1%} | {r['t1_ms']:.1f} | {r['t1_share']:.1%} | "
                         f"{r['conf_ms']:.2f} | {r['conf_share']:.1%} |")
            print(lines[-1], flush=True)
            if before is not None:
                lines.append(f"| {preset} (sampler at {a.before}) | {b} | {r['vocab']} | {r['step_ms']:.1f} | | "
                             f"{r['before_t0_ms']:.1f} | {r['before_t0_share']:.1%} | {r['before_t1_ms']:.1f} | "
                             f"{r['before_t1_share']:.1%} |")
                print(lines[-1], flush=True)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
