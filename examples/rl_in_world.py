"""Train a small policy inside the served world, then evaluate it on the real environment.

    worldserve serve --model-repo models &                      # tiny, denoiser, dynamic on :50051
    python examples/rl_in_world.py --model tiny --episodes 300  # or --model dynamic (the ball world)

The agent never touches the real environment while it learns: every episode is a session with the served world
model through `worldserve.client.gym.RemoteWorldEnv` (reset from a real start frame, then predicted frames, rewards
and done). The policy is linear-softmax over features read off the frame (where the goal lies relative to the
agent, what is in front and to the sides), trained with REINFORCE. It is then run on held-out layouts of the real
environment (the simulator, never seen in training) next to a random policy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from worldserve.client.gym import RemoteWorldEnv, minigrid_context, world_of
from worldserve.lab.data.collect import ENVS
from worldserve.lab.data.minigrid_env import DIR_VEC, EMPTY, GOAL, Simulator, read_agent, read_cells

N_FEATURES, N_ACTIONS = 10, 3


def features(frame: np.ndarray) -> np.ndarray:
    """uint8 [64, 64, 3] -> float [10]: bias; goal ahead / behind / to the right / to the left (in the agent's
    frame); the cell in front is the goal / free / blocked; left and right cells free."""
    phi = np.zeros(N_FEATURES)
    phi[0] = 1.0
    cells, agent = read_cells(frame), read_agent(frame)
    goals = np.argwhere(cells == GOAL)  # [[y, x]]
    if agent is None or len(goals) == 0:  # a predicted frame that lost the agent or the goal: bias only
        return phi
    x, y, d = agent
    fwd, right = np.array(DIR_VEC[d]), np.array(DIR_VEC[(d + 1) % 4])
    g = np.array([goals[0][1] - x, goals[0][0] - y])
    ahead, side = int(g @ fwd), int(g @ right)
    phi[1:5] = [ahead > 0, ahead < 0, side > 0, side < 0]

    def kind(v):
        cx, cy = x + v[0], y + v[1]
        return cells[cy, cx] if 0 <= cx < 8 and 0 <= cy < 8 else -1

    front = kind(fwd)
    phi[5:10] = [front == GOAL, front == EMPTY, front not in (EMPTY, GOAL), kind(-right) == EMPTY, kind(right) == EMPTY]
    return phi


class LinearPolicy:
    def __init__(self, seed: int = 0):
        self.w = np.zeros((N_FEATURES, N_ACTIONS))
        self.rng = np.random.default_rng(seed)

    def probs(self, phi: np.ndarray) -> np.ndarray:
        z = phi @ self.w
        p = np.exp(z - z.max())
        return p / p.sum()

    def act(self, frame: np.ndarray) -> tuple[int, np.ndarray]:
        phi = features(frame)
        return int(self.rng.choice(N_ACTIONS, p=self.probs(phi))), phi

    def reinforce(self, episodes: list[list[tuple[np.ndarray, int, float]]], lr: float, gamma: float) -> None:
        """One policy-gradient step over a batch of episodes [(phi, action, reward)], baseline = mean return."""
        steps = []
        for ep in episodes:
            g = 0.0
            for phi, a, r in reversed(ep):
                g = r + gamma * g
                steps.append((phi, a, g))
        base = np.mean([g for *_, g in steps])
        grad = np.zeros_like(self.w)
        for phi, a, g in steps:
            p = self.probs(phi)
            grad += np.outer(phi, np.eye(N_ACTIONS)[a] - p) * (g - base)
        self.w += lr * grad / len(episodes)


def train_in_world(env: RemoteWorldEnv, policy: LinearPolicy, episodes: int, batch: int, lr: float, gamma: float,
                   seed: int) -> list[float]:
    returns, buf = [], []
    for i in range(episodes):
        frame, _ = env.reset(seed=seed + i)
        ep, done = [], False
        while not done:
            a, phi = policy.act(frame)
            frame, r, term, trunc, _ = env.step(a)
            ep.append((phi, a, float(r)))
            done = term or trunc
        buf.append(ep)
        returns.append(sum(r for *_, r in ep))
        if len(buf) == batch:
            policy.reinforce(buf, lr, gamma)
            buf = []
        if (i + 1) % 50 == 0:
            print(f"  in the world: episodes {i - 48}-{i + 1}: mean predicted return {np.mean(returns[-50:]):.3f}",
                  flush=True)
    return returns


def evaluate_real(act, env: str, seeds: list[int], max_steps: int) -> tuple[float, float]:
    """(success rate, mean return) of act(frame) -> action on the real environment's held-out layouts."""
    wins, rets = 0, []
    for s in seeds:
        sim = Simulator(s, max_steps=max_steps, env_cls=ENVS[env])
        frame, ret = sim.frame(), 0.0
        while not sim.done:
            frame, r, _ = sim.step(act(frame))
            ret += r
        wins += ret > 0
        rets.append(ret)
    return wins / len(seeds), float(np.mean(rets))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc", default="127.0.0.1:50051")
    p.add_argument("--model", default="tiny")
    p.add_argument("--env", choices=tuple(ENVS), help="the real environment the model learned (default: the model's "
                   "own world, client.gym.world_of: dynamic and maskgit = the ball world)")
    p.add_argument("--episodes", type=int, default=300, help="training episodes inside the served world")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--max-steps", type=int, default=32)
    p.add_argument("--eval-layouts", type=int, default=50, help="held-out real layouts (seeds 2,000,000 on)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.env = a.env or world_of(a.model)  # each world starts from its own frames

    world = RemoteWorldEnv(a.grpc, a.model, context_fn=minigrid_context(a.env), max_steps=a.max_steps)
    policy = LinearPolicy(a.seed)
    t0 = time.time()
    returns = train_in_world(world, policy, a.episodes, a.batch, a.lr, a.gamma, a.seed)
    world.close()
    print(f"trained {a.episodes} episodes inside `{a.model}` in {time.time() - t0:.0f} s "
          f"(mean predicted return: first 50 {np.mean(returns[:50]):.3f}, last 50 {np.mean(returns[-50:]):.3f})")

    seeds = list(range(2_000_000, 2_000_000 + a.eval_layouts))
    rng = np.random.default_rng(a.seed)
    untrained = LinearPolicy(a.seed)  # uniform over actions, like random, through the same code path
    rows = [("random", evaluate_real(lambda f: int(rng.integers(N_ACTIONS)), a.env, seeds, a.max_steps)),
            ("untrained linear policy", evaluate_real(lambda f: untrained.act(f)[0], a.env, seeds, a.max_steps)),
            (f"policy trained in `{a.model}`", evaluate_real(lambda f: policy.act(f)[0], a.env, seeds, a.max_steps))]
    print(f"\non the real environment ({a.env}, {len(seeds)} held-out layouts, max {a.max_steps} steps):")
    print("| policy | success | mean return |\n|---|---|---|")
    for name, (win, ret) in rows:
        print(f"| {name} | {100 * win:.0f}% | {ret:.3f} |")


if __name__ == "__main__":
    main()
