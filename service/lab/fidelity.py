"""Distribution fidelity of a world model of the stochastic world (`data.dynamic_env`): are sampled futures right
in distribution, not just in the mean?

For each held-out state (4 context frames of an episode the training never saw), the served model samples K futures
at temperature 1 (one fork of K candidates, candidate k on stream seed + k) and the simulator gives K futures of
its own (clones of the same state with independent randomness), under the same actions. Compared:
- obstacle occupancy at steps 1, 4, 8: for every cell, the fraction of futures with a ball there; the
  total-variation distance between the two occupancy maps (each normalised to sum 1) per state, averaged.
- ball count: the fraction of model futures with as many balls as the world has (sampling each token on its own
  can make balls vanish or split; the simulator always keeps them).
- collision calibration: the model's done probability for the next step vs the simulator's collision frequency
  over the K clones, binned over states: expected calibration error.
Balls are read off the pixels (the centre of a cell is pure blue), identically for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .card import write_card_table
from .data.collect import HELDOUT_SEED0
from .data.dynamic_env import DynamicObstaclesEnv
from .data.minigrid_env import TILE, episode_epsilon, expert_action

CONTEXT = 4
BLUE = np.array([0, 0, 255], np.uint8)


BALL_TOL = 64  # a continuous model's frames carry small pixel noise; every other colour of the world is >= 155 away


def balls(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 64, 64, 3] -> bool [..., 8, 8]: cells whose centre pixel is a ball's blue, within BALL_TOL per
    channel (a token model decodes the exact colour; a denoiser's frames are near it)."""
    c = frames[..., TILE // 2 :: TILE, TILE // 2 :: TILE, :].astype(np.int16)
    return (np.abs(c - BLUE.astype(np.int16)) <= BALL_TOL).all(-1)


@dataclass
class State:
    env: DynamicObstaclesEnv  # the simulator at the last context frame
    context: np.ndarray  # uint8 [CONTEXT, 64, 64, 3]
    context_actions: np.ndarray  # int64 [CONTEXT - 1]
    actions: np.ndarray  # int64 [H]: the actions both futures take


def heldout_states(n: int, horizon: int, seed0: int = HELDOUT_SEED0) -> list[State]:
    """n states from fresh episodes: an epsilon-expert walks CONTEXT-1 steps, then the next `horizon` actions."""
    out, s = [], seed0
    while len(out) < n:
        env = DynamicObstaclesEnv()
        env.reset(seed=s)
        rng = np.random.default_rng(s + 99)
        frames, acts, ok = [env.frame()], [], True
        for _ in range(CONTEXT - 1):
            a = expert_action(env)
            a = int(rng.integers(3)) if a is None or rng.random() < episode_epsilon(s) else a
            _, _, term, trunc, _ = env.step(a)
            frames.append(env.frame())
            acts.append(a)
            ok = ok and not (term or trunc)
        if ok:
            future = rng.integers(0, 3, horizon)  # a random plan: the odds of each future under it
            out.append(State(env, np.stack(frames), np.asarray(acts, np.int64), future.astype(np.int64)))
        s += 1
    return out


def simulate(st: State, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K simulator futures: frames uint8 [K, H, 64, 64, 3], collided bool [K, H] (absorbing after the end)."""
    h = len(st.actions)
    frames = np.zeros((k, h, 64, 64, 3), np.uint8)
    hit = np.zeros((k, h), bool)
    for i in range(k):
        env, done = st.env.clone(seed * 100_003 + i), False
        for t, a in enumerate(st.actions):
            if not done:
                _, _, term, trunc, info = env.step(int(a))
                done = term or trunc
                hit[i, t] = bool(info.get("collision"))
            else:
                hit[i, t] = hit[i, t - 1]
            frames[i, t] = env.frame()
    return frames, hit


def sample_model(engine, st: State, k: int, seed: int, temperature: float = 1.0):
    """K model futures through the engine (one fork): frames uint8 [K, H, ...], done probability [K, H]."""
    from ..engine.engine import complete
    from ..messages import RolloutRequest

    req = RolloutRequest("fid", engine.spec.name, st.context, np.repeat(st.actions[None], k, 0),
                         context_actions=st.context_actions, seed=seed, temperature=temperature)
    h = len(st.actions)
    frames = np.zeros((k, h, 64, 64, 3), np.uint8)
    done = np.zeros((k, h), np.float32)
    for ev in complete(engine, [req]):
        if not ev.final:
            frames[ev.candidate, ev.step], done[ev.candidate, ev.step] = ev.frame, ev.done
    return frames, done


def tv(p: np.ndarray, q: np.ndarray) -> float:
    # occupancy maps -> total variation of the normalised maps; a map with no ball at all is maximally far
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0 if p.sum() == q.sum() else 1.0
    p, q = p / p.sum(), q / q.sum()
    return 0.5 * float(np.abs(p - q).sum())


@dataclass
class Fidelity:
    tv: dict[int, float]  # step -> mean TV of occupancy maps
    floor: dict[int, float]  # step -> the same TV between two independent sets of simulator futures (K samples)
    count_ok: dict[int, float]  # step -> fraction of model futures with the right number of balls
    count_ratio: dict[int, float]  # step -> mean number of balls in model futures / the world's number
    ece: float  # collision calibration error at step 1
    bins: list = field(default_factory=list)  # (predicted mean, true mean, states) per bin
    n_states: int = 0
    k: int = 0


def fidelity(model, n_states: int, k: int = 256, steps=(1, 4, 8), seed: int = 0) -> Fidelity:
    from ..engine.engine import Engine
    from ..settings import EngineSettings

    h = max(steps)
    engine = Engine(model, EngineSettings(max_slots=k, max_queue=4, max_candidates=k))
    tvs: dict[int, list[float]] = {s: [] for s in steps}
    floors: dict[int, list[float]] = {s: [] for s in steps}
    counts: dict[int, list[float]] = {s: [] for s in steps}
    ratios: dict[int, list[float]] = {s: [] for s in steps}
    pred, true = [], []
    for j, st in enumerate(heldout_states(n_states, h)):
        mf, md = sample_model(engine, st, k, seed + j * k)
        sf, shit = simulate(st, k, seed + j)
        sf2, shit2 = simulate(st, k, seed + j + 7_919)  # the measure's own noise floor at K samples
        n_balls = len(st.env.obstacles)
        for s in steps:
            alive = ~shit[:, s - 1]  # occupancy of worlds still running (a collision ends the episode)
            mo, so = balls(mf[:, s - 1]), balls(sf[:, s - 1][alive]) if alive.any() else balls(sf[:, s - 1])
            tvs[s].append(tv(mo.mean(0), so.mean(0)))
            alive2 = ~shit2[:, s - 1]
            so2 = balls(sf2[:, s - 1][alive2]) if alive2.any() else balls(sf2[:, s - 1])
            floors[s].append(tv(so2.mean(0), so.mean(0)))
            counts[s].append(float((mo.sum((1, 2)) == n_balls).mean()))
            ratios[s].append(float(mo.sum((1, 2)).mean()) / max(n_balls, 1))
        pred.append(float(md[:, 0].mean()))
        true.append(float(shit[:, 0].mean()))
    pred_a, true_a = np.asarray(pred), np.asarray(true)
    edges = np.array([0.0, 0.02, 0.1, 0.2, 0.35, 0.5, 1.0001])
    bins, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (pred_a >= lo) & (pred_a < hi)
        if m.any():
            bins.append((float(pred_a[m].mean()), float(true_a[m].mean()), int(m.sum())))
            ece += m.mean() * abs(pred_a[m].mean() - true_a[m].mean())
    def mean(d: dict) -> dict[int, float]:
        return {s: float(np.mean(v)) for s, v in d.items()}

    return Fidelity(mean(tvs), mean(floors), mean(counts), mean(ratios), float(ece), bins, n_states, k)


def table(f: Fidelity) -> str:
    rows = [f"| fidelity ({f.n_states} held-out states x {f.k} sampled futures, temperature 1) | value |", "|---|---|"]
    rows += [f"| occupancy TV at step {s}, model vs simulator (simulator vs itself: the floor at K) | {v:.3f} "
             f"({f.floor[s]:.3f}) |" for s, v in f.tv.items()]
    rows += [f"| futures with the right ball count, step {s} (mean count, model / world) | {100 * v:.1f}% "
             f"({f.count_ratio[s]:.2f}) |" for s, v in f.count_ok.items()]
    rows.append(f"| collision calibration error, step 1 (ECE over states) | {f.ece:.3f} |")
    rows += [f"| calibration bin: predicted {p:.3f} vs true {t:.3f} ({n} states) |  |" for p, t, n in f.bins]
    return "\n".join(rows)


@dataclass
class RareEvents:
    """Collision within `horizon` steps, in states where the world gives it probability <= `p_max`."""

    true_rate: float  # simulator frequency, pooled over the states
    rates: dict[str, float]  # variant -> the model's sampled frequency, pooled
    ci: dict[str, tuple[float, float]]  # variant -> 95 % interval of that frequency
    n_states: int
    k: int


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    w = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - w), float(c + w)


def collision_prob(done: np.ndarray) -> np.ndarray:
    """done probability float [K, H] (per step, given no collision before) -> [K]: P(a collision within H steps)."""
    return 1.0 - np.prod(1.0 - np.clip(done.astype(np.float64), 0.0, 1.0), axis=1)


def mean_ci(x: np.ndarray, z: float = 1.96) -> tuple[float, tuple[float, float]]:
    """Values in [0, 1] [n] -> (mean, its normal-approximation interval, clipped to [0, 1])."""
    if len(x) == 0:
        return float("nan"), (0.0, 1.0)
    m, h = float(x.mean()), z * float(x.std(ddof=1) if len(x) > 1 else 0.0) / np.sqrt(len(x))
    return m, (max(0.0, m - h), min(1.0, m + h))


def rare_states(n_states: int, k: int, horizon: int = 4, p_max: float = 0.05, candidates: int | None = None,
                seed: int = 0, world_k: int = 0, seed0: int = HELDOUT_SEED0 + 50_000) -> tuple[list[State], float]:
    """States where the world gives a collision within `horizon` probability in (0, p_max] (over K simulator futures):
    -> (states, the world's pooled rate).

    world_k > 0: the rate from world_k fresh simulator futures per state, independent of the K that chose the states
    (keeping a state because its K futures had a hit in (0, p_max] biases those same futures' rate). seed0: the
    pool's first episode seed (the evaluation's pool by default; lab/calibrate.py draws its own, disjoint)."""
    pool = heldout_states(candidates or 8 * n_states, horizon, seed0=seed0)
    kept, hits, n = [], 0, 0
    for j, st in enumerate(pool):
        _, hit = simulate(st, k, seed + j)
        rate = hit[:, -1].mean()
        if 0 < rate <= p_max:
            kept.append(st)
            if world_k:
                _, hit = simulate(st, world_k, seed + j + 104_729)
            hits, n = hits + int(hit[:, -1].sum()), n + len(hit)
        if len(kept) == n_states:
            break
    return kept, hits / max(n, 1)


def rare_events(variants: dict, n_states: int, k: int = 256, horizon: int = 4, p_max: float = 0.05,
                candidates: int | None = None, seed: int = 0, world_k: int = 0) -> RareEvents:
    """Each variant (name -> model) samples K futures per state through the engine; its rate is the collision
    probability within `horizon` its futures imply (collision_prob: the rule of maskgit_fidelity.rare_rate and of
    lab/knobs.py's rare_check). States are kept where the simulator's collision frequency over K clones is in
    (0, p_max]: the rare futures that quantization could wash out."""
    from ..engine.engine import Engine
    from ..settings import EngineSettings

    kept, true_rate = rare_states(n_states, k, horizon, p_max, candidates, seed, world_k)
    rates, ci = {}, {}
    for name, model in variants.items():
        eng = Engine(model, EngineSettings(max_slots=k, max_queue=4, max_candidates=k))
        probs = [collision_prob(sample_model(eng, st, k, seed + j * k)[1]) for j, st in enumerate(kept)]  # [K] each
        rates[name], ci[name] = mean_ci(np.concatenate(probs) if probs else np.zeros(0))
    return RareEvents(true_rate, rates, ci, len(kept), k)


def rare_table(r: RareEvents) -> str:
    rows = [f"| collision within the horizon, {r.n_states} states with true p <= 5 % x {r.k} futures | frequency | "
            "95 % interval | vs fp32 |", "|---|---|---|---|",
            f"| simulator | {r.true_rate:.4f} | | |"]
    ref = r.rates.get("fp32")
    for name, v in r.rates.items():
        rel = "" if not ref else f"{(v - ref) / ref:+.0%}"
        rows.append(f"| {name} | {v:.4f} | {r.ci[name][0]:.4f} – {r.ci[name][1]:.4f} | {rel} |")
    return "\n".join(rows)


def variant(model, name: str):
    """The model under a precision variant, as the server applies it (fp32 is the model itself)."""
    from ..runtime.loader import with_precision

    return with_precision(model, name)


def fidelity_dir(model_dir, n_states: int, k: int, variants: list[str], rare_states: int, write_card: bool) -> str:
    """`worldserve fidelity`: fidelity and rare-event tables of a model of the stochastic world (its card)."""
    from ..model.io import load_model_dir

    model = load_model_dir(model_dir)
    text = table(fidelity(model, n_states, k))
    if rare_states:
        text += "\n\n" + rare_table(rare_events({v: variant(model, v) for v in variants}, rare_states, k))
    print(text)
    if write_card:
        write_card_table(model_dir, text, "fidelity")
    return text
