"""Held-out evaluation: tokenizer PSNR, open-loop PSNR vs copy-last-frame, reward / done accuracy.

Open loop: 4 context frames (with their actions), then 8 steps predicted from the true actions
through the serving path (prefill + cached step + greedy sampling + decode), on episodes from
fresh seeds the training never saw.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.collect import HELDOUT_SEED0
from .data.minigrid_env import episode_epsilon, run_episode
from .model.dynamics import advance
from .model.sampling import sample
from .model.world_model import WorldModel

CONTEXT, HORIZON, REPORT_STEPS = 4, 8, (1, 4, 8)


def heldout_episodes(n: int, seed0: int = HELDOUT_SEED0):
    """n held-out episodes, each at least CONTEXT + HORIZON frames long (terminated ones padded)."""
    out, s = [], seed0
    while len(out) < n:
        f, a, r, d = run_episode(s, episode_epsilon(s), pad=HORIZON + CONTEXT)
        if len(a) >= CONTEXT + HORIZON - 1:
            out.append((f, a, r, d))
        s += 1
    return out


EXACT = 100.0  # the PSNR reported for identical frames (MSE 0)


def psnr(mse: float) -> float:
    return EXACT if mse <= 1e-10 else 10 * math.log10(255.0**2 / mse)


@dataclass
class EvalResult:
    recon_psnr: float
    model_psnr: dict[int, float]
    baseline_psnr: dict[int, float]
    token_acc: dict[int, float]
    reward_acc: float
    reward_event_recall: float
    done_acc: float
    n_episodes: int
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def open_loop(model: WorldModel, eps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict HORIZON frames per episode. Returns frames uint8 [E, H, 64, 64, 3], reward [E, H], done [E, H]."""
    e = len(eps)
    ctx = torch.from_numpy(np.stack([f[:CONTEXT] for f, *_ in eps]))  # uint8 [E, C, 64, 64, 3]
    acts = torch.from_numpy(np.stack([a[: CONTEXT - 1 + HORIZON] for _, a, *_ in eps]))  # [E, C-1+H]
    tokens = model.encode(ctx.flatten(0, 1)).view(e, CONTEXT, -1)  # [E, C, N]
    cache = model.allocate_cache(e)
    slots = torch.arange(e)
    model.prefill(cache, slots, tokens, acts[:, : CONTEXT - 1])
    zeros = torch.zeros(e, dtype=torch.int64)
    frames, rewards, dones = [], [], []
    for h in range(HORIZON):
        logits, r, d = model.step(cache, slots, acts[:, CONTEXT - 1 + h])
        nxt = sample(logits, torch.zeros(e), zeros, zeros, zeros + h)  # greedy
        advance(cache, slots, nxt)
        frames.append(model.decode(nxt))
        rewards.append(r)
        dones.append(d)
    return (torch.stack(frames, 1).numpy(), torch.stack(rewards, 1).numpy(), torch.stack(dones, 1).numpy())


@torch.no_grad()
def evaluate(model: WorldModel, eps) -> EvalResult:
    # 1. tokenizer reconstruction over every held-out frame
    allf = torch.from_numpy(np.concatenate([f for f, *_ in eps]))
    rec = torch.cat([model.decode(model.encode(allf[i : i + 512])) for i in range(0, len(allf), 512)])
    recon = psnr(float(((rec.float() - allf.float()) ** 2).mean()))
    # 2. open loop against truth and the copy-last-frame baseline
    pred, rew, done = open_loop(model, eps)
    truth = np.stack([f[CONTEXT : CONTEXT + HORIZON] for f, *_ in eps]).astype(np.float32)
    last = np.stack([f[CONTEXT - 1] for f, *_ in eps]).astype(np.float32)[:, None]
    true_r = np.stack([r[CONTEXT - 1 : CONTEXT - 1 + HORIZON] for *_, r, _ in eps])
    true_d = np.stack([d[CONTEXT - 1 : CONTEXT - 1 + HORIZON] for *_, d in eps])
    true_tok = model.encode(torch.from_numpy(truth.astype(np.uint8)).flatten(0, 1)).view(len(eps), HORIZON, -1)
    pred_tok = model.encode(torch.from_numpy(pred).flatten(0, 1)).view(len(eps), HORIZON, -1)
    mp, bp, ta = {}, {}, {}
    for s in REPORT_STEPS:
        mp[s] = psnr(float(((pred[:, s - 1].astype(np.float32) - truth[:, s - 1]) ** 2).mean()))
        bp[s] = psnr(float(((last[:, 0] - truth[:, s - 1]) ** 2).mean()))
        ta[s] = float((pred_tok[:, s - 1] == true_tok[:, s - 1]).float().mean())
    ev = true_r > 0
    return EvalResult(
        recon_psnr=recon, model_psnr=mp, baseline_psnr=bp, token_acc=ta,
        reward_acc=float(((rew > 0.25) == ev).mean()),
        reward_event_recall=float(((rew > 0.25) & ev).sum() / max(1, ev.sum())),
        done_acc=float(((done > 0.5) == true_d).mean()), n_episodes=len(eps),
        extra={"reward_events": int(ev.sum()), "done_steps": int(true_d.sum())},
    )


def _db(v: float) -> str:
    return "exact (MSE 0)" if v >= EXACT else f"{v:.2f} dB"


def table(r: EvalResult, title: str = "fp32") -> str:
    rows = [
        f"| metric ({title}, {r.n_episodes} held-out episodes) | value |",
        "|---|---|",
        f"| tokenizer reconstruction PSNR | {_db(r.recon_psnr)} |",
    ]
    for s in REPORT_STEPS:
        m, b = r.model_psnr[s], r.baseline_psnr[s]
        gain = "" if m >= EXACT else f" (+{m - b:.2f})"
        rows.append(f"| open-loop PSNR step {s} (model / copy-last baseline) | {_db(m)} / {_db(b)}{gain} |")
    for s in REPORT_STEPS:
        rows.append(f"| token agreement step {s} | {100 * r.token_acc[s]:.2f}% |")
    rows += [
        f"| reward accuracy (reward > 0 vs not, open loop) | {100 * r.reward_acc:.1f}% |",
        f"| reward event recall ({r.extra['reward_events']} events) | {100 * r.reward_event_recall:.1f}% |",
        f"| done accuracy ({r.extra['done_steps']} done steps) | {100 * r.done_acc:.1f}% |",
    ]
    return "\n".join(rows)


def write_card_table(model_dir: Path, text: str) -> None:
    card = model_dir / "MODEL_CARD.md"
    body = card.read_text()
    block = f"<!-- eval:start -->\n## Evaluation\n\n{text}\n<!-- eval:end -->"
    if "<!-- eval:start -->" in body:
        body = re.sub(r"<!-- eval:start -->.*<!-- eval:end -->", block, body, flags=re.S)
    else:
        head, sep, sha = body.rpartition("\nweights_sha256:")
        body = f"{head.rstrip()}\n\n{block}\n{sep}{sha}"
    card.write_text(body)


def evaluate_dir(model_dir: Path, n_episodes: int, write_card: bool = True, variant: str = "fp32") -> bool:
    from .model.io import load_model_dir

    eps = heldout_episodes(n_episodes)
    model = load_model_dir(model_dir)
    ref = evaluate(model, eps)
    text = table(ref)
    ok = True
    if variant != "fp32":
        from .runtime.quantize import quantize_model

        qres = evaluate(quantize_model(model, variant), eps)
        loss8 = ref.model_psnr[8] - qres.model_psnr[8]
        ok = loss8 <= 0.5
        text += "\n\n" + table(qres, variant) + (
            f"\n\n{variant} vs fp32 at step 8: {-loss8:+.2f} dB (gate: lose at most 0.5 dB) -> "
            f"{'PASS' if ok else 'FAIL'}")
    print(text)
    if write_card and variant == "fp32":
        write_card_table(model_dir, text)
    return ok
