"""Frame quality, written once: PSNR and the serving quality gate (no torch here).

The gate: a served variant (another precision, backend or kernel) of a model may lose at most
`GATE_DB` of open-loop PSNR at step `GATE_STEP` against the fp32 eager reference on held-out rollouts.
`worldserve quantize`, `worldserve eval --variant` and the precision tests all judge with `passes_gate`.
"""

from __future__ import annotations

import math

EXACT = 100.0  # the PSNR reported for identical frames (MSE 0)
GATE_DB = 0.5
GATE_STEP = 8


def psnr(mse: float, peak: float = 255.0) -> float:
    """PSNR in dB of a mean squared error on values of range `peak` (255 for uint8, 4 for [-1, 1])."""
    return EXACT if mse <= 1e-10 else 10 * math.log10(peak**2 / mse)


def gate_loss(ref_psnr: dict[int, float], psnr_by_step: dict[int, float]) -> float:
    """dB lost at the gate's step (positive = worse than the reference)."""
    return ref_psnr[GATE_STEP] - psnr_by_step[GATE_STEP]


def passes_gate(ref_psnr: dict[int, float], psnr_by_step: dict[int, float]) -> bool:
    return gate_loss(ref_psnr, psnr_by_step) <= GATE_DB


def gate_verdict(ref_psnr: dict[int, float], psnr_by_step: dict[int, float], what: str) -> str:
    loss = gate_loss(ref_psnr, psnr_by_step)
    return (f"{what} vs fp32 at step {GATE_STEP}: {-loss:+.2f} dB open-loop PSNR (gate: lose at most {GATE_DB} dB) "
            f"-> {'PASS' if loss <= GATE_DB else 'FAIL'}")
