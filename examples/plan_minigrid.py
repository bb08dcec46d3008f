"""Drive the real MiniGrid environment with a world model served by worldserve (model-predictive control).

Every control tick: send the last <= 8 real frames (and the actions between them) plus K candidate action
sequences in ONE latent-only Rollout, score the predicted rewards / dones, do the best first action for real.

    .venv/bin/worldserve serve --model-dir models/tiny &          # REST :8000, gRPC :50051
    .venv/bin/python examples/plan_minigrid.py --grpc 127.0.0.1:50051 --episodes 3

At a fixed control rate, --tick-ms 500 makes every tick's Rollout an anytime rollout: at the budget the server ends
it with the steps reached so far, and the planner scores those. --model dynamic (or maskgit) plans in the ball world
its model was trained on (client.gym.world_of).

The full evaluation (random policy, this planner, the planner on the true simulator) is `worldserve plan`.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from worldserve.client.client import GrpcClient
from worldserve.client.gym import world_of
from worldserve.lab.data.envs import ENVS
from worldserve.lab.data.minigrid_env import ACTION_NAMES, Simulator
from worldserve.lab.plan import HELDOUT_PLAN_SEED0, CEMPlanner, PlanConfig, RemoteWorld


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc", default="127.0.0.1:50051")
    p.add_argument("--model", default="tiny")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed0", type=int, default=HELDOUT_PLAN_SEED0)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--tick-ms", type=int, default=0, help="control tick budget (0: wait for every step)")
    a = p.parse_args()

    cfg = PlanConfig(candidates=a.candidates, horizon=a.horizon)
    world = RemoteWorld(GrpcClient(a.grpc), a.model, tick_ms=a.tick_ms)  # reads context_window from ListModels
    for seed in range(a.seed0, a.seed0 + a.episodes):
        env = Simulator(seed, env_cls=ENVS[world_of(a.model)])  # the real environment the model learned
        world.reset(env, seed)  # (the remote world ignores the simulator: it only ever sees frames)
        planner = CEMPlanner(cfg, seed=seed)
        frames, actions, ret = [env.frame()], [], 0.0
        while not env.done:
            t0 = time.perf_counter()
            action, _, scores = planner.plan(partial(world.evaluate, frames, actions))
            ms = 1000 * (time.perf_counter() - t0)
            frame, reward, _ = env.step(action)
            frames.append(frame)
            actions.append(action)
            ret += reward
            print(f"seed {seed} step {len(actions):2d}: {ACTION_NAMES[action]:<7} best score {scores.max():+.3f} "
                  f"({ms:.0f} ms for {cfg.candidates}x{cfg.horizon})" + (f"  reward {reward:.3f}" if reward else ""))
        print(f"seed {seed}: {'reached the goal' if ret > 0 else 'failed'}, return {ret:.3f}, {len(actions)} steps\n")


if __name__ == "__main__":
    main()
