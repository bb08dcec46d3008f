"""Joint fidelity of within-frame decoding (issue 19), through the engine (the serving path: `engine=` an Engine over
the model, as lab/knobs.py measures every knob) or the plain-PyTorch reference sampler (model/maskgit.py).

On held-out states of the stochastic world (fidelity.heldout_states), K futures per state sampled by the model
(one prefill, forked into K slots; candidate k keys its own stream) against K simulator futures:
- right count: the fraction of sampled frames with exactly the world's number of balls, at steps 1 and 4;
- configuration TV at steps 1 and 4: total variation between the distributions of whole ball configurations (the
  set of ball cells of a frame), model vs world (futures still running); the floor is the world against itself at
  the same K;
- rare collisions: collision within the horizon in states where the world gives it probability in (0, p_max]
  (fidelity.rare_states), the collision probability the model's futures imply (1 - prod_t (1 - done_t)) vs the
  world's frequency; the world's rate comes from an independent, larger set of simulator futures than the one that
  chose the states (the choice alone would bias it).

    python -m worldserve.lab.maskgit_fidelity models/maskgit --settings default,cosine:sampled:8:1 --k 256
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..model.maskgit import sample_frame
from ..model.sampling import sample
from .fidelity import State, balls, collision_prob, heldout_states, mean_ci, rare_states, sample_model, simulate


@torch.no_grad()
def model_futures(model, st: State, k: int, seed: int, temperature: float = 1.0, last_frame: bool = True,
                  **decode) -> tuple[np.ndarray, np.ndarray]:
    """K model futures of a state: balls bool [K, H, 8, 8], done probability float [K, H].

    A model with a frame head decodes each frame with `sample_frame` (decode: its scheme, passes, noise, shape,
    confidence; default the spec's); a parallel model samples step's logits at once. Row k is keyed (seed,
    candidate k, step t): alone or batched, the same. last_frame=False: the done probabilities only at the last
    step (its frame is not sampled)."""
    h = len(st.actions)
    state = model.allocate_cache(k)
    slots = torch.arange(k)
    ctx = model.encode(torch.from_numpy(st.context))[None]  # [1, C, N]
    model.prefill(state, slots[:1], ctx, torch.from_numpy(st.context_actions)[None])
    model.fork(state, 0, slots)
    seeds, cand = torch.full((k,), seed, dtype=torch.int64), torch.arange(k)
    temp = torch.full((k,), float(temperature))
    out_balls = np.zeros((k, h, 8, 8), bool)
    done = np.zeros((k, h), np.float32)
    for t in range(h):
        acts = torch.full((k,), int(st.actions[t]), dtype=torch.int64)
        if t == 0:  # every slot holds the same context: step one, fork its state (KV, conditioning) into all K
            logits, _, d = model.step(state, slots[:1], acts[:1])
            model.fork(state, 0, slots)
            logits, d = logits.expand(k, -1, -1), d.expand(k)
        else:
            logits, _, d = model.step(state, slots, acts)
        done[:, t] = d.float().numpy()
        if t == h - 1 and not last_frame:
            break
        step = torch.full((k,), t, dtype=torch.int64)
        if getattr(model, "frame_head", None) is not None:
            tok = sample_frame(model, state, slots, seeds, cand, step,
                               temperature=temperature * model.spec.decode_temperature, **decode)
        else:
            tok = sample(logits, temp, seeds, cand, step)
        model.advance(state, slots, tok)
        out_balls[:, t] = balls(model.decode(tok).numpy())
    return out_balls, done


def config_dist(b: np.ndarray) -> Counter:
    # balls bool [K, 8, 8] -> Counter of whole configurations (the frame's set of ball cells), normalised
    c = Counter(x.tobytes() for x in np.packbits(b.reshape(len(b), -1), axis=1))
    return Counter({key: v / len(b) for key, v in c.items()})


def config_tv(p: Counter, q: Counter) -> float:
    return 0.5 * sum(abs(p.get(key, 0.0) - q.get(key, 0.0)) for key in set(p) | set(q))


def engine_futures(engine, st: State, k: int, seed: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """K futures of a state through the engine (one request of K candidates, decoded as the model's spec says): balls
    bool [K, H, 8, 8], done probability float [K, H]."""
    frames, done = sample_model(engine, st, k, seed, temperature)
    return balls(frames), done


def _futures(model, engine, st: State, k: int, seed: int, temperature: float, last_frame: bool = True, **decode):
    if engine is None:
        return model_futures(model, st, k, seed, temperature, last_frame, **decode)
    if decode:
        raise ValueError("through the engine the decoding is the model's spec: configure the model (lab/knobs.py)")
    return engine_futures(engine, st, k, seed, temperature)


@dataclass
class World:
    """The simulator side of one state, computed once for every setting measured."""

    st: State
    alive_balls: dict[int, np.ndarray]  # step -> balls bool [K', 8, 8] of the futures still running
    floor: dict[int, float]  # step -> configuration TV, world vs world (independent K)

    @property
    def floor_tv1(self) -> float:
        return self.floor[1]


def world_side(states: list[State], k: int, steps: tuple[int, ...], seed: int) -> list[World]:
    out = []
    for j, st in enumerate(states):
        sf, shit = simulate(st, k, seed + j)
        sf2, shit2 = simulate(st, k, seed + j + 7_919)

        def alive(f, hit, s):
            keep = ~hit[:, s - 1]
            return balls(f[:, s - 1][keep] if keep.any() else f[:, s - 1])

        ab = {s: alive(sf, shit, s) for s in steps}
        out.append(World(st, ab, {s: config_tv(config_dist(alive(sf2, shit2, s)), config_dist(ab[s])) for s in steps}))
    return out


def joint_fidelity(model, worlds: list[World], k: int, temperature: float = 1.0, seed: int = 0,
                   steps: tuple[int, ...] = (1, 4), engine=None, **decode) -> dict:
    """-> {"count": {step: fraction right}, "tv": {step: mean configuration TV}, "floor": {step: the world's floor},
    "tv1", "floor1" (step 1's)}. engine: an Engine over `model` (the serving path), or None: the reference sampler
    (decode: its knobs, see model_futures)."""
    counts: dict[int, list[float]] = {s: [] for s in steps}
    tvs: dict[int, list[float]] = {s: [] for s in steps}
    for j, w in enumerate(worlds):
        mb, _ = _futures(model, engine, w.st, k, seed + j * k, temperature, **decode)
        n_balls = len(w.st.env.obstacles)
        for s in steps:
            counts[s].append(float((mb[:, s - 1].sum((1, 2)) == n_balls).mean()))
            tvs[s].append(config_tv(config_dist(mb[:, s - 1]), config_dist(w.alive_balls[s])))
    tv = {s: float(np.mean(v)) for s, v in tvs.items()}
    floor = {s: float(np.mean([w.floor[s] for w in worlds])) for s in steps}
    return {"count": {s: float(np.mean(v)) for s, v in counts.items()}, "tv": tv, "floor": floor,
            "tv1": tv.get(1, float("nan")), "floor1": floor.get(1, float("nan"))}


def rare_rate(model, states: list[State], k: int, temperature: float = 1.0, seed: int = 0, engine=None,
              **decode) -> tuple[float, tuple[float, float]]:
    """The model's collision frequency within the horizon, pooled over states x K sampled futures, with a 95 %
    interval: each future contributes its probability of a collision, 1 - prod_t (1 - done_t) (done_t: the model's
    probability that step t ends the episode, given the future's frames so far), the frequency the served model
    implies. (Counting a future as a collision when done_t > 0.5 would miss every collision the world gives odds
    below one half, e.g. a ball stepping onto the agent (1/5), and count only near-certain ones.) engine: as in
    joint_fidelity."""
    probs = []
    for j, st in enumerate(states):
        _, done = _futures(model, engine, st, k, seed + j * k, temperature, last_frame=False, **decode)
        probs.append(collision_prob(done))
    return mean_ci(np.concatenate(probs) if probs else np.zeros(0))


def main(argv: list[str] | None = None) -> None:
    from ..model.io import load_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--settings", default="default",
                   help="comma-separated decodings to measure: 'default' (the spec's), or schedule:confidence:passes"
                   ":noise, e.g. cosine:sampled:8:1 (MaskGIT / Genie at 8 passes) or sequential:max:8:0")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--states", type=int, default=32)
    p.add_argument("--rare-states", type=int, default=16)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model_dir(a.model_dir)
    t0 = time.time()
    worlds = world_side(heldout_states(a.states, 4), a.k, (1, 4), 0)
    rare, true_rate = rare_states(a.rare_states, a.k) if a.rare_states else ([], 0.0)
    print(f"world side: {time.time() - t0:.0f} s; {a.states} states, {len(rare)} rare states (world rate "
          f"{true_rate:.4f}), K = {a.k}", flush=True)
    print("| decoding | right count step 1 | right count step 4 | config TV step 1 (floor) | rare rate (95 % CI), "
          "x the world's |\n|---|---|---|---|---|", flush=True)
    for name in a.settings.split(","):
        t1 = time.time()
        if name == "default":
            sp = model.spec
            decode = {}
            label = (f"default: {sp.decoding}" if sp.decoding != "maskgit" else
                     f"default: {sp.schedule} / {sp.confidence}, {sp.passes} passes, noise {sp.choice_noise:g}")
        else:
            shape, conf, passes, noise = name.split(":")
            decode = {"scheme": "maskgit", "passes": int(passes), "noise": float(noise), "shape": shape,
                      "confidence": conf}
            label = f"{shape} / {conf}, {passes} passes, noise {noise}"
        f = joint_fidelity(model, worlds, a.k, a.temperature, **decode)
        r, ci = rare_rate(model, rare, a.k, a.temperature, **decode) if rare else (0.0, (0.0, 0.0))
        ratio = r / true_rate if true_rate else float("nan")
        print(f"| {label} | {100 * f['count'][1]:.1f}% | {100 * f['count'][4]:.1f}% | {f['tv1']:.3f} "
              f"({f['floor1']:.3f}) | {r:.4f} ({ci[0]:.4f} – {ci[1]:.4f}), x{ratio:.2f} | "
              f"<!-- {time.time() - t1:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
