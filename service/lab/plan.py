"""Model-predictive control through the serving API: a remote CEM planner over discrete actions.

Every control tick the planner sends the observation history (the last `context_window` real frames and
the actions between them) and K candidate action sequences of horizon H to the server in ONE latent-only
Rollout (frames="none": reward and done per step), scores each candidate, executes the first action of
the best one in the real environment, shifts its sampling distribution by one step and repeats.

Candidates: sampling i.i.d. discrete actions barely moves a turn/turn/forward agent (turns cancel out), so
random shooting almost never sees a sparse goal reward. The candidate set is therefore (1) the previous
best plan shifted by one step, (2) a library of L-shaped motion primitives (turn 0-3 times, run r cells,
turn once, run to the horizon: every goal an L-shaped free path reaches within H steps is covered), and (3)
samples from a per-step categorical distribution that CEM refits to the elite candidates each tick and
warm-starts across ticks. Ties (no candidate sees a reward) are broken at random, so the agent explores.

This module talks to the world model only through `worldserve.client.client` (no torch, no model import). The
same planner runs on the true simulator (deep copies of the environment as the "world model"), which
bounds what a perfect world model would achieve with this search.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from .data.envs import ENVS
from .data.minigrid_env import N_ACTIONS, Simulator, expert_action

LEFT, RIGHT, FORWARD = 0, 1, 2
HELDOUT_PLAN_SEED0 = 2_000_000  # evaluation layouts: never used for training (train 0.., held-out eval 1,000,000..)


@dataclass
class PlanConfig:
    candidates: int = 64  # K sequences per tick, all in one Rollout (the server caps it at max_candidates)
    horizon: int = 16  # H steps per sequence
    gamma: float = 0.95  # discount: reach the goal sooner
    lava_penalty: float = 1.0  # cost of a predicted episode end without reward (lava)
    reward_threshold: float = 0.1  # a predicted reward above this counts as reaching the goal
    elite: int = 8  # CEM elite count
    smoothing: float = 0.5  # CEM update: p <- (1 - s) p + s * elite frequencies
    primitives: bool = True  # include the L-shaped motion-primitive library
    futures: int = 1  # M sampled futures per candidate (seeded streams; needs temperature > 0 to differ)
    # drop this fraction of a tick's futures, the least confident (their frames' mean confidence, RolloutEvent
    # .confidence) from their candidates' means; a candidate keeps all its futures if all would go (0: keep every one)
    discard_uncertain: float = 0.0
    seed: int = 0


def score(rewards: np.ndarray, dones: np.ndarray, cfg: PlanConfig) -> np.ndarray:
    """Expected discounted return of each candidate. rewards, dones: float [K, H] -> float [K].

    The episode survives step t with probability prod(1 - done[:t]); a step whose predicted done comes
    without reward (lava in MiniGrid) costs `lava_penalty`.
    """
    k, h = rewards.shape
    alive = np.ones(k)
    total = np.zeros(k)
    for t in range(h):
        r, d = np.asarray(rewards[:, t], float), np.clip(np.asarray(dones[:, t], float), 0.0, 1.0)
        death = d * (r <= cfg.reward_threshold)
        total += cfg.gamma**t * alive * (r - cfg.lava_penalty * death)
        alive = alive * (1.0 - d)
    return total


def future_weights(conf: np.ndarray | None, k: int, m: int, discard: float) -> np.ndarray:
    """Which futures count in their candidate's mean. conf: float [K*M, H] the frames' confidence (NaN: none, or a
    step not reached) or None; k candidates x m futures -> float [K, M] in {0, 1}.

    A future's confidence is the mean over its frames; the least confident `discard` fraction of the tick's futures
    (ties kept) are dropped. A candidate whose futures would all be dropped keeps them all, and a model that gives
    no confidence keeps every future."""
    if conf is None or discard <= 0 or not np.isfinite(conf).any():
        return np.ones((k, m))
    seen = np.isfinite(conf)  # [K*M, H]
    n = seen.sum(1)
    per = np.where(n > 0, np.where(seen, conf, 0.0).sum(1) / np.maximum(n, 1), np.inf)  # no confidence: kept
    w = (per >= np.quantile(per[n > 0], discard)).astype(float).reshape(k, m)
    w[w.sum(1) == 0] = 1.0
    return w


def primitive_library(horizon: int, max_run: int = 6) -> np.ndarray:
    """L-shaped paths: {none, L, R, L L} then `run` forwards (0..max_run-1), then {L, R}, then forwards
    to the horizon. int64 [P, horizon] (P = 4 * max_run * 2 = 48 for the defaults)."""
    out = []
    for first in ([], [LEFT], [RIGHT], [LEFT, LEFT]):
        for run in range(max_run):
            for second in (LEFT, RIGHT):
                seq = (first + [FORWARD] * run + [second] + [FORWARD] * horizon)[:horizon]
                out.append(seq)
    return np.unique(np.asarray(out, np.int64), axis=0)


class CEMPlanner:
    """Discrete CEM with warm start. `plan(evaluate)` returns the action to execute now."""

    def __init__(self, cfg: PlanConfig, n_actions: int = N_ACTIONS, seed: int = 0):
        self.cfg, self.n = cfg, n_actions
        self.rng = np.random.default_rng(seed)
        self.prior = np.full(n_actions, 1.0 / n_actions)
        if n_actions == 3:
            self.prior = np.array([0.25, 0.25, 0.5])  # forward-biased: turns cancel, forwards move
        self.probs = np.tile(self.prior, (cfg.horizon, 1))
        self.best: np.ndarray | None = None
        lib = primitive_library(cfg.horizon) if cfg.primitives and n_actions == 3 else np.zeros((0, cfg.horizon))
        self.library = lib.astype(np.int64)

    def propose(self) -> np.ndarray:
        """K candidate sequences, int64 [K, H]: previous best (shifted), primitives, CEM samples."""
        k, h = self.cfg.candidates, self.cfg.horizon
        rows = [self.best[None]] if self.best is not None else []
        room = k - len(rows) - min(8, k // 4)  # keep some CEM samples
        lib = self.library
        if len(lib) > room:  # small K: a random subset of the primitives each tick
            lib = lib[np.sort(self.rng.choice(len(lib), max(0, room), replace=False))]
        rows.append(lib)
        n_sample = k - sum(len(r) for r in rows)
        u = self.rng.random((n_sample, h, 1))
        samples = (u > np.cumsum(self.probs, axis=1)[None]).sum(-1).clip(0, self.n - 1)
        rows.append(samples)
        return np.concatenate(rows).astype(np.int64)[:k]

    def update(self, cands: np.ndarray, scores: np.ndarray) -> int:
        """Refit to the elites, remember the best plan, shift one step; returns the action to take now."""
        jitter = self.rng.random(len(scores)) * 1e-9  # random tie-break: explore when nothing is predicted
        order = np.argsort(-(scores + jitter), kind="stable")
        elite = cands[order[: self.cfg.elite]]
        freq = np.stack([(elite == a).mean(0) for a in range(self.n)], axis=1)  # [H, n]
        s = self.cfg.smoothing
        self.probs = (1 - s) * self.probs + s * freq
        best = cands[order[0]]
        action = int(best[0])
        self.best = np.concatenate([best[1:], [FORWARD if self.n == 3 else best[-1]]])
        self.probs = np.concatenate([self.probs[1:], self.prior[None]])
        return action

    def plan(self, evaluate) -> tuple[int, np.ndarray, np.ndarray]:
        """evaluate(rows int64 [K*M, H]) -> (rewards [K*M, H], dones [K*M, H][, confidence [K*M, H]]). Returns
        (action, cands, scores).

        Each candidate is sent M = cfg.futures times (rows k*M .. k*M+M-1); every row draws its own seeded
        stream, so the M rows are M sampled futures of that action sequence. A candidate's score is the mean
        of its futures' returns: the expected return under the world's odds, not the return of its mode. With
        cfg.discard_uncertain and a model that gives its frames' confidence, the least confident futures of the
        tick leave the means (future_weights).
        """
        cands = self.propose()  # int64 [K, H]
        m = max(1, self.cfg.futures)
        out = evaluate(np.repeat(cands, m, axis=0))  # float [K*M, H] each
        rewards, dones = out[0], out[1]
        w = future_weights(out[2] if len(out) > 2 else None, len(cands), m, self.cfg.discard_uncertain)  # [K, M]
        ret = score(rewards, dones, self.cfg).reshape(len(cands), m)
        scores = (ret * w).sum(1) / w.sum(1)  # float [K]
        return self.update(cands, scores), cands, scores


# ---------------------------------------------------------------------------------------------- worlds
class RemoteWorld:
    """The served world model: latent-only Rollouts per tick through a worldserve client, at most `max_rows`
    candidate rows each (the server's max_candidates); rows beyond it go in further Rollouts of the same tick.

    tick_ms > 0: a fixed control rate. Each tick's Rollouts are anytime rollouts whose deadline is what is left of
    the tick: at the deadline the server ends them with the steps reached so far, and the planner scores every
    candidate on the steps it reached (a step not reached adds no reward and no risk). `reached` keeps, per tick,
    the fraction of candidate-steps that came back.

    Candidates share their common work on the server (engine/prefix.py): greedy rows with equal action prefixes are
    computed once. Sampled (temperature > 0) rollouts ask for common random numbers (crn, on by default there): the
    noise is keyed by the action prefix, so candidates are compared under the same draws (less noisy elites) and
    equal prefixes are computed once too. Identical rows (the M futures of a candidate) must still be M different
    futures: the f-th copy of a row goes to the f-th Rollout of the tick, seeded apart (a scenario per copy)."""

    def __init__(self, client, model: str = "tiny", context_window: int | None = None, temperature: float = 0.0,
                 max_rows: int = 64, tick_ms: int = 0, crn: bool | None = None):
        self.client, self.model, self.temperature, self.max_rows = client, model, temperature, max_rows
        self.crn = temperature > 0 if crn is None else crn
        self.tick_ms = tick_ms
        self.reached: list[float] = []
        if context_window is None:
            info = [m for m in client.models() if _field(m, "name") == model]
            if not info:
                raise ValueError(f"model {model!r} is not served")
            context_window = int(_field(info[0], "context_window"))
        self.window = context_window
        self.tick = 0

    def reset(self, sim: Simulator, seed: int) -> None:
        del sim  # the planner only sees frames
        self.seed, self.tick = seed, 0

    def evaluate(self, frames: list[np.ndarray], actions: list[int], cands: np.ndarray):
        ctx = frames[-self.window :]
        ctx_actions = [int(a) for a in actions[len(actions) - (len(ctx) - 1) :]] if len(ctx) > 1 else None
        k, h = cands.shape
        rewards, dones, conf = np.zeros((k, h)), np.zeros((k, h)), np.full((k, h), np.nan)
        self.tick += 1
        seed = (self.seed * 1000 + self.tick) * 4096  # row r of this tick draws from stream seed + r
        end = time.monotonic() + self.tick_ms / 1000
        got = 0
        opts = {"common_random_numbers": True} if self.crn else {}
        for rows, rseed in self._batches(cands, seed):  # int64 [R] row indices of cands, the Rollout's seed
            budget = {}
            if self.tick_ms:
                left = int((end - time.monotonic()) * 1000)
                if left < 1:
                    break  # the tick is spent: the rest of the candidates are scored on nothing
                budget = dict(deadline_ms=left, anytime=True)
            for ev in self.client.rollout(self.model, np.stack(ctx), cands[rows].tolist(), context_actions=ctx_actions,
                                          frames="none", seed=rseed, temperature=self.temperature, **budget, **opts):
                if hasattr(ev, "truncated"):  # an anytime rollout's end (client.RolloutEnd): steps reached
                    continue
                rewards[rows[ev.candidate], ev.step] = ev.reward
                dones[rows[ev.candidate], ev.step] = ev.done
                if ev.confidence is not None:
                    conf[rows[ev.candidate], ev.step] = ev.confidence
                got += 1
        self.reached.append(got / (k * h))
        return rewards, dones, conf


    def _batches(self, cands: np.ndarray, seed: int) -> list[tuple[np.ndarray, int]]:
        """The tick's Rollouts: (rows of cands, seed), at most max_rows rows each. Without crn row r draws stream
        seed + r. With crn the f-th copy of a row goes to scenario f (its own Rollouts, seed + f * 2^20): equal
        prefixes share noise within a scenario, copies of a candidate are different futures."""
        k = len(cands)
        if not self.crn:
            return [(np.arange(lo, min(k, lo + self.max_rows)), seed + lo) for lo in range(0, k, self.max_rows)]
        seen: dict[bytes, int] = {}
        copy = np.empty(k, np.int64)  # how many identical rows came before each row
        for r in range(k):
            key = cands[r].tobytes()
            copy[r] = seen.get(key, 0)
            seen[key] = copy[r] + 1
        out = []
        for f in range(int(copy.max()) + 1):
            rows = np.flatnonzero(copy == f)
            out.extend((rows[lo : lo + self.max_rows], seed + f) for lo in range(0, len(rows), self.max_rows))
        return out


class SimWorld:
    """The true simulator as the world model (upper bound): every candidate row runs on a copy of the true
    state whose future randomness is its own (a stochastic world's rows are independent sampled futures)."""

    def reset(self, sim: Simulator, seed: int) -> None:
        self.sim, self.rng = sim, np.random.default_rng(seed)

    def evaluate(self, frames, actions, cands: np.ndarray):
        del frames, actions
        k, h = cands.shape
        rewards, dones = np.zeros((k, h)), np.zeros((k, h))
        for i in range(k):
            s = self.sim.clone(int(self.rng.integers(2**63)))
            for t in range(h):
                if s.done:
                    dones[i, t:] = 1.0
                    break
                _, r, term = s.step(int(cands[i, t]), render=False)  # rewards only: no frame to draw
                rewards[i, t], dones[i, t] = r, float(term)
        return rewards, dones


def _field(m, name):
    return m[name] if isinstance(m, dict) else getattr(m, name)


# ---------------------------------------------------------------------------------------------- policies
class MPCPolicy:
    def __init__(self, world, cfg: PlanConfig):
        self.world, self.cfg = world, cfg
        self.latencies: list[float] = []

    def reset(self, sim: Simulator, seed: int) -> None:
        self.world.reset(sim, seed)
        self.planner = CEMPlanner(self.cfg, seed=self.cfg.seed * 7919 + seed)

    def act(self, frames: list[np.ndarray], actions: list[int]) -> int:
        t0 = time.perf_counter()
        a, _, _ = self.planner.plan(lambda c: self.world.evaluate(frames, actions, c))
        self.latencies.append(time.perf_counter() - t0)
        return a


class RandomPolicy:
    def __init__(self, seed: int = 0):
        self.seed0 = seed

    def reset(self, sim: Simulator, seed: int) -> None:
        del sim
        self.rng = np.random.default_rng(self.seed0 * 7919 + seed)

    def act(self, frames, actions) -> int:
        del frames, actions
        return int(self.rng.integers(0, N_ACTIONS))


class ExpertPolicy:
    """Shortest path on the true state (BFS): the best any policy can do on these layouts."""

    def reset(self, sim: Simulator, seed: int) -> None:
        del seed
        self.sim = sim

    def act(self, frames, actions) -> int:
        del frames, actions
        a = expert_action(self.sim.env)
        return FORWARD if a is None else a


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EpisodeResult:
    seed: int
    success: bool
    ret: float
    steps: int
    actions: list[int] = field(default_factory=list)


def run_episode(policy, seed: int, max_steps: int = 64, env: str = "minigrid") -> EpisodeResult:
    sim = Simulator(seed, max_steps=max_steps, env_cls=ENVS[env])
    policy.reset(sim, seed)
    frames, actions, ret, success = [sim.frame()], [], 0.0, False
    while not sim.done:
        a = policy.act(frames, actions)
        frame, r, _ = sim.step(a)
        frames.append(frame)
        actions.append(a)
        ret += r
        success = success or r > 0
    return EpisodeResult(seed, success, ret, len(actions), actions)


@dataclass
class Summary:
    name: str
    episodes: list[EpisodeResult]
    latencies: list[float]  # seconds per planning tick
    candidates: int = 0
    horizon: int = 0
    reached: list[float] = field(default_factory=list)  # per tick: fraction of candidate-steps back (tick budget)

    @property
    def success_rate(self) -> float:
        return sum(e.success for e in self.episodes) / max(1, len(self.episodes))

    @property
    def mean_return(self) -> float:
        return statistics.fmean(e.ret for e in self.episodes) if self.episodes else 0.0

    def row(self) -> str:
        n = len(self.episodes)
        cells = [self.name, f"{n}", f"{100 * self.success_rate:.0f}% ({sum(e.success for e in self.episodes)}/{n})",
                 f"{self.mean_return:.3f}", f"{statistics.fmean(e.steps for e in self.episodes):.1f}"]
        if self.latencies:
            lat = sorted(self.latencies)
            p50, p95 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            per_s = self.candidates / statistics.fmean(lat)
            cells += [f"{1000 * p50:.0f} / {1000 * p95:.0f}", f"{per_s:.0f} ({per_s * self.horizon:.0f})"]
        else:
            cells += ["-", "-"]
        cells.append(f"{100 * statistics.fmean(self.reached):.0f}%" if self.reached else "-")
        return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| policy | episodes | success | mean return | mean steps | tick latency p50 / p95 (ms) "
                "| candidates/s (candidate-steps/s) | candidate-steps reached |\n|---|---|---|---|---|---|---|---|")


def evaluate(name: str, policy, seeds: list[int], max_steps: int = 64, cfg: PlanConfig | None = None,
             log=None, env: str = "minigrid") -> Summary:
    eps = []
    for s in seeds:
        eps.append(run_episode(policy, s, max_steps, env))
        if log is not None:
            e = eps[-1]
            log(f"{name} seed {s}: {'success' if e.success else 'fail'} return {e.ret:.3f} steps {e.steps}")
    lat = list(getattr(policy, "latencies", []))
    reached = list(getattr(getattr(policy, "world", None), "reached", []))
    return Summary(name, eps, lat, cfg.candidates if cfg else 0, cfg.horizon if cfg else 0, reached)


def eval_seeds(n: int, seed0: int = HELDOUT_PLAN_SEED0) -> list[int]:
    return list(range(seed0, seed0 + n))
