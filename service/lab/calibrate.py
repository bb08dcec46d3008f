"""Post-hoc calibration of a world model's done head (issue 19): Platt scaling of the done logit, fitted on the
model's own sampled futures against the simulator's, on states disjoint from every evaluation.

The rare-collision metric (maskgit_fidelity.rare_rate) is the probability of a collision within H steps that the
served model's futures imply: per future 1 - prod_t (1 - done_t), averaged over K futures. With done_t =
sigmoid(a * l_t + b) (l_t the done logit the served model gives step t of future k; the frames do not depend on the
done head, so one set of futures serves every (a, b)), a state s implies

    p_s(a, b) = mean_k [1 - prod_t (1 - sigmoid(a * l_skt + b))]        # [S]

and the simulator gives hits_s episode ends (the done head's event: a collision, lava or the goal; in a rare state
every end is a collision) in n_s independent futures of the same state under the same actions. The fit minimizes
the binomial negative log-likelihood sum_s -[hits_s log p_s + (n_s - hits_s) log(1 - p_s)] over (log a, b) (L-BFGS,
float64, deterministic): the rate the metric measures, matched state by state. It is composed with the calibration
the model already has (a' = a * a0, b' = a * b0 + b) and written into config.json (done_scale, done_bias;
model/dynamics.py applies it in the heads, so eager, compiled, ONNX and quantized models all get it; the weights, and
their sha256, are unchanged).

States (calibration_states): fidelity.heldout_states from CALIB_SEED0 (episode seeds 500,000..: every level of
risk) and states chosen as the rare-collision evaluation chooses its own (fidelity.rare_states) from a pool at
CALIB_SEED0 + 50,000; training uses seeds 0..1999, the evaluations 1,000,000.. and 1,050,000...

    worldserve calibrate models/maskgit --states 48 --rare-states 24 --k 32 --world-k 512 --threads 1
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fidelity import State, heldout_states, rare_states, sample_model

CALIB_SEED0 = 500_000  # calibration episodes: disjoint from training (0..1999) and evaluation (>= 1,000,000)
WORLD_SEED = 31_337  # offsets the simulator's clone streams from the ones the evaluation uses


@dataclass
class CalibData:
    logits: np.ndarray  # float64 [S, K, H]: the served done logit of step t of sampled future k of state s
    hits: np.ndarray  # int64 [S]: simulator futures whose episode ends within H steps (a collision, lava, the goal)
    n: np.ndarray  # int64 [S]: simulator futures per state
    collisions: np.ndarray | None = None  # int64 [S]: of the hits, collisions (the rare metric's event)


def world_ends(st: State, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K simulator futures of a state under its actions -> (ended bool [K], by a collision bool [K]) within H steps.

    The done head predicts the episode's end of any cause (collision, lava, goal: the training data's `dones`), so
    it is fitted against the world's ends; where the plan reaches no lava or goal (every rare state) that is a
    collision. Clone streams as fidelity.simulate's."""
    ended, collided = np.zeros(k, bool), np.zeros(k, bool)
    for i in range(k):
        env = st.env.clone(seed * 100_003 + i)
        for a in st.actions:
            _, _, term, trunc, info = env.step(int(a))
            if term or trunc:
                ended[i], collided[i] = True, bool(info.get("collision"))
                break
    return ended, collided


def logit(p: np.ndarray) -> np.ndarray:
    """Probabilities float [...] -> their logits float64 (clipped off 0 and 1 so float32's extremes stay finite)."""
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def collect(model, states: list[State], k: int, world_k: int, seed: int = 0, log=None) -> CalibData:
    """K futures per calibration state through the engine (the serving path, one request of K candidates) and
    world_k simulator futures of the same state under the same actions."""
    from ..engine.engine import Engine
    from ..settings import EngineSettings

    log = log or (lambda line: None)
    eng = Engine(model, EngineSettings(max_slots=k, max_queue=4, max_candidates=k))
    n_states, horizon = len(states), len(states[0].actions) if states else 0
    logits = np.zeros((n_states, k, horizon))
    hits, n = np.zeros(n_states, np.int64), np.full(n_states, world_k, np.int64)
    collisions = np.zeros(n_states, np.int64)
    t0 = time.time()
    for j, st in enumerate(states):
        _, done = sample_model(eng, st, k, seed + j * k)  # done probability float32 [K, H]
        logits[j] = logit(done)
        ended, collided = world_ends(st, world_k, seed + j + WORLD_SEED)
        hits[j], collisions[j] = int(ended.sum()), int(collided.sum())
        if (j + 1) % 8 == 0:
            log(f"calibration states {j + 1}/{n_states}: {time.time() - t0:.0f} s")
    return CalibData(logits, hits, n, collisions)


def calibration_states(n_states: int, rare_n: int, horizon: int = 4, seed: int = 0) -> tuple[list[State], int]:
    """n_states from CALIB_SEED0 (the whole range of risks: the slope) + rare_n chosen as fidelity.rare_states
    chooses the evaluation's (world p in (0, 5 %] over 64 clones; the goal's regime) from their own pool at
    CALIB_SEED0 + 50,000 -> (states, how many are rare: the last ones)."""
    general = heldout_states(n_states, horizon, seed0=CALIB_SEED0) if n_states else []
    rare = rare_states(rare_n, 64, horizon, seed=seed, seed0=CALIB_SEED0 + 50_000)[0] if rare_n else []
    return general + rare, len(rare)


def concat(parts: list[CalibData]) -> CalibData:
    return CalibData(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("logits", "hits", "n", "collisions")))


def implied(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logits [S, K, H] -> [S]: the collision probability within H the futures imply under done = sigmoid(a l + b)."""
    log_alive = torch.nn.functional.logsigmoid(-(a * logits + b)).sum(-1)  # log prod_t (1 - done_t): [S, K]
    return (-torch.expm1(log_alive)).mean(-1)


def nll(data: CalibData, a: float, b: float) -> float:
    """The binomial negative log-likelihood of the world's hits under (a, b), per simulator future."""
    return float(_nll(torch.from_numpy(data.logits), torch.from_numpy(data.hits).double(),
                      torch.from_numpy(data.n).double(), torch.tensor(float(a), dtype=torch.float64),
                      torch.tensor(float(b), dtype=torch.float64)))


def _nll(lg, hits, n, a, b):
    p = implied(lg, a, b).clamp(1e-12, 1 - 1e-12)
    return -(hits * p.log() + (n - hits) * torch.log1p(-p)).sum() / n.sum()


def fit(data: CalibData, iters: int = 200) -> tuple[float, float]:
    """-> (a, b) minimizing the binomial NLL of the world's hits (a > 0: through log a), from the identity."""
    lg = torch.from_numpy(data.logits).double()
    hits, n = torch.from_numpy(data.hits).double(), torch.from_numpy(data.n).double()
    u = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # log a
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, b], lr=1.0, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(lg, hits, n, u.exp(), b)
        loss.backward()
        return loss

    opt.step(closure)
    return float(u.detach().exp()), float(b.detach())


def compose(a: float, b: float, a0: float, b0: float) -> tuple[float, float]:
    """(a, b) fitted on logits already calibrated by (a0, b0) -> the one calibration of the raw logit."""
    return a * a0, a * b0 + b


def rates(data: CalibData, a: float = 1.0, b: float = 0.0) -> tuple[float, float]:
    """-> (the model's implied rate, the world's), pooled over the states."""
    a_t, b_t = torch.tensor(float(a), dtype=torch.float64), torch.tensor(float(b), dtype=torch.float64)
    p = implied(torch.from_numpy(data.logits), a_t, b_t)
    return float(p.mean()), float(data.hits.sum() / data.n.sum())


def calibrate_dir(model_dir, n_states: int, rare_n: int, k: int, world_k: int, seed: int = 0, write: bool = True,
                  command: str = "") -> tuple[float, float]:
    """`worldserve calibrate`: fit on the served model, write done_scale / done_bias into config.json and a table
    into the card. -> the composed (done_scale, done_bias)."""
    from ..model.io import CONFIG, load_model_dir, read_config
    from .card import write_card_table

    model_dir = Path(model_dir)
    model = load_model_dir(model_dir)
    a0, b0 = model.cfg.done_scale, model.cfg.done_bias
    t0 = time.time()
    states, n_rare = calibration_states(n_states, rare_n, seed=seed)
    print(f"{len(states)} calibration states ({n_rare} rare): {time.time() - t0:.0f} s", flush=True)
    data = collect(model, states, k, world_k, seed=seed, log=lambda line: print(line, flush=True))
    a, b = fit(data)
    scale, bias = compose(a, b, a0, b0)
    rows = []
    for what, sel in ((f"all {len(states)}", np.ones(len(states), bool)),
                      (f"the {n_rare} rare ones, collisions only", (np.arange(len(states)) >= n_states)
                       & (data.hits == data.collisions))):
        part = CalibData(data.logits[sel], data.hits[sel], data.n[sel])
        (before, world), (after, _) = rates(part), rates(part, a, b)
        rows.append(f"| {what} | {before:.4f} | {after:.4f} | {world:.4f} | x{before / world:.2f} -> "
                    f"x{after / world:.2f} | {nll(part, 1.0, 0.0):.4f} -> {nll(part, a, b):.4f} |")
    text = (f"Done head: sigmoid({scale:.4f} x logit {bias:+.4f}) (config.json done_scale / done_bias; before: "
            f"sigmoid({a0:g} x logit {b0:+g})): Platt scaling fitted by `{command}` in {time.time() - t0:.0f} s, on "
            f"{n_states} states from episode seeds {CALIB_SEED0:,}.. (every level of risk) and {n_rare} chosen as the "
            f"rare-collision evaluation chooses its states (world p within 4 steps in (0, 5 %] over 64 clones) from "
            f"seeds {CALIB_SEED0 + 50_000:,}..: disjoint from training (0..1999) and from every evaluation "
            f"(1,000,000.. and 1,050,000..). K = {k} futures a state through the engine against {world_k} simulator "
            "futures; the binomial NLL of the world's episode ends within 4 steps (the done head's event: a "
            "collision, lava or the goal) under the probability the futures imply, 1 - prod_t (1 - done_t).\n\n"
            "| calibration states | model's implied rate, before | after | world's | ratio | NLL per world future |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(text)
    if write:
        raw = read_config(model_dir)
        raw["done_scale"], raw["done_bias"] = round(scale, 6), round(bias, 6)
        (model_dir / CONFIG).write_text(json.dumps(raw, indent=2) + "\n")
        write_card_table(model_dir, text, "calibration")
    return scale, bias
