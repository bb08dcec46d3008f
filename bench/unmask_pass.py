"""The cost of one MaskGIT pass's unmasking (model/maskgit.unmask_pass) under `max` confidence, before and after it
draws only the positions it keeps (one run, ratios).

    python -m bench.unmask_pass

Before: the plain reference that draws a token at every position and then chooses
(model/maskgit.unmask_pass_drawing_everything; tests/unit/test_maskgit.py holds the two bit-equal). After:
unmask_pass, which chooses first ("max" ranks by log max_v p, independent of the values drawn) and samples the kept
positions only. One frame's 8 passes of the served schedule (sequential), per pass, best of 5, one torch thread:
tiny's shape (64 rows x 64 positions x 64 codes) and a base-scale vocabulary (4 rows x 64 positions x 64,000 codes).
Writes bench/reports/unmask_pass.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worldserve.model.maskgit import sequential_schedule, unmask_pass, unmask_pass_drawing_everything  # noqa: E402

SHAPES = ((64, 64, 64), (4, 64, 64_000))  # rows, positions, vocabulary


def per_pass_ms(fn, logits: torch.Tensor, passes: int = 8) -> float:
    b, n, _ = logits.shape
    keys = torch.arange(b), torch.arange(b), torch.zeros(b, dtype=torch.int64)
    best = float("inf")
    for _ in range(5):
        partial, known = torch.zeros(b, n, dtype=torch.int64), torch.zeros(b, n, dtype=torch.bool)
        t0 = time.perf_counter()
        for p, k in enumerate(sequential_schedule(n, passes)):
            partial, known, _ = fn(logits, partial, known, torch.full((b,), k), torch.ones(b), *keys,
                                   torch.full((b,), p), "max", 0.0)
        best = min(best, (time.perf_counter() - t0) / passes * 1e3)
    return best


def main() -> None:
    torch.set_num_threads(1)
    lines = ["| rows x positions x vocabulary | drawing every position (ms a pass) | the kept ones only | speed-up |",
             "|---|---:|---:|---:|"]
    for b, n, v in SHAPES:
        logits = torch.randn(b, n, v, generator=torch.Generator().manual_seed(0)) * 3
        before = per_pass_ms(unmask_pass_drawing_everything, logits)
        after = per_pass_ms(unmask_pass, logits)
        lines.append(f"| {b} x {n} x {v} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")
        print(lines[-1], flush=True)
    text = "# unmask_pass under `max` confidence: drawing only the kept positions\n\n" + "\n".join(lines) + (
        "\n\nOne frame's 8 passes (sequential schedule), per pass, best of 5, one torch thread; "
        "`python -m bench.unmask_pass`.\n")
    out = ROOT / "bench" / "reports" / "unmask_pass.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
