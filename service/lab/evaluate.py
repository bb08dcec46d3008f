"""Held-out evaluation: tokenizer PSNR, open-loop PSNR vs copy-last-frame, reward / done accuracy.

Open loop: 4 context frames (with their actions), then 8 steps predicted from the true actions
through the serving path itself (the engine: encode + prefill + step + greedy sampling or the model's own
denoising + decode), on episodes from fresh seeds the training never saw. Any model that implements the
world-model protocol is evaluated the same way; token agreement is reported for token models only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.engine import Engine, complete
from ..messages import RolloutRequest
from ..model.protocol import WorldModelProtocol
from ..model.quality import EXACT, gate_verdict, passes_gate, psnr
from ..settings import EngineSettings
from .card import write_card_table
from .data.collect import HELDOUT_SEED0
from .data.minigrid_env import episode_epsilon, run_episode

CONTEXT, HORIZON, REPORT_STEPS = 4, 8, (1, 4, 8)


def heldout_episodes(n: int, seed0: int = HELDOUT_SEED0, env: str = "minigrid", horizon: int = HORIZON):
    """n held-out episodes of `env`, each at least CONTEXT + horizon frames long (terminated ones padded)."""
    from .data.envs import ENVS

    out, s = [], seed0
    while len(out) < n:
        f, a, r, d = run_episode(s, episode_epsilon(s), pad=horizon + CONTEXT, env_cls=ENVS[env],
                                 max_steps=max(64, horizon + CONTEXT))
        if len(a) >= CONTEXT + horizon - 1:
            out.append((f, a, r, d))
        s += 1
    return out






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
def open_loop(model: WorldModelProtocol, eps, horizon: int = HORIZON, seed: int = 0,
              temperature: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict `horizon` frames per episode through the engine, all episodes in one batch.

    Returns frames uint8 [E, horizon, H, W, 3], reward float32 [E, horizon], done probability [E, horizon].
    """
    e = len(eps)
    eng = Engine(model, EngineSettings(max_slots=e, max_queue=e, max_candidates=1))
    reqs = [RolloutRequest(f"ep{i}", model.spec.name, f[:CONTEXT], a[None, CONTEXT - 1 : CONTEXT - 1 + horizon],
                           context_actions=a[: CONTEXT - 1], seed=seed + i, temperature=temperature)
            for i, (f, a, *_) in enumerate(eps)]
    h, w = model.spec.height, model.spec.width
    frames = np.zeros((e, horizon, h, w, 3), np.uint8)
    rewards, dones = np.zeros((e, horizon), np.float32), np.zeros((e, horizon), np.float32)
    for ev in complete(eng, reqs):
        if ev.final:
            if ev.error:
                raise RuntimeError(f"open loop failed for {ev.request_id}: {ev.error.name} {ev.message}")
            continue
        i = int(ev.request_id[2:])
        frames[i, ev.step], rewards[i, ev.step], dones[i, ev.step] = ev.frame, ev.reward, ev.done
    return frames, rewards, dones


@torch.no_grad()
def frame_tokens(model: WorldModelProtocol, frames: np.ndarray, chunk: int = 512) -> torch.Tensor:
    """uint8 [E, H, h, w, 3] -> the model's tokens int64 [E, H, N], encoded `chunk` frames at a time."""
    flat = torch.from_numpy(np.ascontiguousarray(frames).reshape(-1, *frames.shape[2:]))
    tokens = torch.cat([model.encode(flat[i : i + chunk]) for i in range(0, len(flat), chunk)])
    return tokens.view(*frames.shape[:2], -1)


@torch.no_grad()
def evaluate(model: WorldModelProtocol, eps) -> EvalResult:
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
    tokens = model.spec.output == "logits"
    if tokens:
        true_tok, pred_tok = frame_tokens(model, truth.astype(np.uint8)), frame_tokens(model, pred)
    mp, bp, ta = {}, {}, {}
    for s in REPORT_STEPS:
        mp[s] = psnr(float(((pred[:, s - 1].astype(np.float32) - truth[:, s - 1]) ** 2).mean()))
        bp[s] = psnr(float(((last[:, 0] - truth[:, s - 1]) ** 2).mean()))
        if tokens:
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
        f"| {'tokenizer' if r.token_acc else 'autoencoder'} reconstruction PSNR | {_db(r.recon_psnr)} |",
    ]
    for s in REPORT_STEPS:
        m, b = r.model_psnr[s], r.baseline_psnr[s]
        gain = "" if m >= EXACT else f" ({m - b:+.2f})"
        rows.append(f"| open-loop PSNR step {s} (model / copy-last baseline) | {_db(m)} / {_db(b)}{gain} |")
    for s in sorted(r.token_acc):
        rows.append(f"| token agreement step {s} | {100 * r.token_acc[s]:.2f}% |")
    rows += [
        f"| reward accuracy (reward > 0 vs not, open loop) | {100 * r.reward_acc:.1f}% |",
        f"| reward event recall ({r.extra['reward_events']} events) | {100 * r.reward_event_recall:.1f}% |",
        f"| done accuracy ({r.extra['done_steps']} done steps) | {100 * r.done_acc:.1f}% |",
    ]
    return "\n".join(rows)


@torch.no_grad()
def drift(model: WorldModelProtocol, eps, horizon: int = 64) -> dict[int, tuple[float, float, float | None]]:
    """Greedy open loop far past the window: step -> (model PSNR dB, copy-last PSNR dB, token agreement with the
    truth's tokens, or None for a latent model), for steps 1 .. `horizon` (64 = 8x tiny's window)."""
    pred, _, _ = open_loop(model, eps, horizon)
    truth_u8 = np.stack([f[CONTEXT : CONTEXT + horizon] for f, *_ in eps])  # uint8 [E, H, h, w, 3]
    truth, last = truth_u8.astype(np.float32), np.stack([f[CONTEXT - 1] for f, *_ in eps]).astype(np.float32)
    agree = None
    if model.spec.output == "logits":
        agree = (frame_tokens(model, pred) == frame_tokens(model, truth_u8)).float().mean((0, 2)).numpy()  # [H]
    return {s: (psnr(float(((pred[:, s - 1] - truth[:, s - 1]) ** 2).mean())),
                psnr(float(((last - truth[:, s - 1]) ** 2).mean())),
                None if agree is None else float(agree[s - 1])) for s in range(1, horizon + 1)}


def drift_table(d: dict, name: str = "fp32", n: int = 0) -> str:
    rows = [f"| step ({name}, {n} held-out episodes, greedy open loop) | model PSNR | copy-last PSNR | tokens equal to "
            "the truth's |", "|---|---|---|---|"]
    for s in (1, 2, 4, 8, 16, 32, 64):
        if s in d:
            m, c, a = d[s]
            rows.append(f"| {s} | {'exact' if m >= EXACT else f'{m:.2f} dB'} | {c:.2f} dB | "
                        f"{'-' if a is None else f'{100 * a:.2f}%'} |")
    return "\n".join(rows)


def evaluate_dir(model_dir: Path, n_episodes: int, write_card: bool = True, variant: str = "fp32",
                 env: str = "minigrid", drift_horizon: int = 0, rare_states: int = 8, k: int = 256,
                 world_k: int = 1024) -> tuple[bool, str]:
    """-> (the variant passes its gates, why not). A variant is a knob setting (lab/knobs.py: a precision, decoding
    knobs, or both); on the stochastic world it must also keep rare collisions within +-20 % of the world's rate."""
    from ..model.io import load_model_dir
    from .knobs import parse

    parse(variant)  # an unknown knob stops here, before anything is evaluated
    eps = heldout_episodes(n_episodes, env=env)
    model = load_model_dir(model_dir)
    ref = evaluate(model, eps)
    text = table(ref)
    ok, why = True, ""
    if variant != "fp32":
        from .knobs import configure, rare_check

        vmodel = configure(model, variant)
        qres = evaluate(vmodel, eps)
        ok = passes_gate(ref.model_psnr, qres.model_psnr)
        why = "" if ok else gate_verdict(ref.model_psnr, qres.model_psnr, variant)
        text += "\n\n" + table(qres, variant) + "\n\n" + gate_verdict(ref.model_psnr, qres.model_psnr, variant)
        if env == "dynamic" and rare_states:  # a stochastic world: rare futures must survive the variant too
            rare_ok, line, _ = rare_check(model, variant, rare_states, k, world_k)
            ok, why = ok and rare_ok, "; ".join(filter(None, [why, "" if rare_ok else line]))
            text += "\n\n" + line
    print(text)
    if write_card and variant == "fp32":
        write_card_table(model_dir, text)
    if drift_horizon:  # long rollouts: the drift curve of fp32 (and the variant) to drift_horizon steps
        long_eps = heldout_episodes(n_episodes, env=env, horizon=drift_horizon)
        dtext = drift_table(drift(model, long_eps, drift_horizon), "fp32", len(long_eps))
        if variant != "fp32":
            dtext += "\n\n" + drift_table(drift(vmodel, long_eps, drift_horizon), variant, len(long_eps))
        print("\n" + dtext)
        if write_card:
            write_card_table(model_dir, dtext, "drift")
    return ok, why
