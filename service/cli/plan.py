"""Users' side subcommands: `plan` (remote MPC evaluation on the real environment) and `rollout`
(predicted frames beside the real environment's frames for the same actions, as a PNG strip or a GIF)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from ..model.quality import psnr


def _markers(env: str) -> tuple[str, str]:
    """The results block of one environment in a markdown file (--write replaces only that block)."""
    tag = "plan-results" if env == "minigrid" else f"plan-results:{env}"
    return f"<!-- {tag} -->", f"<!-- /{tag} -->"


def _client(a):
    from ..client.client import GrpcClient, RestClient

    if a.grpc:
        return GrpcClient(a.grpc)
    return RestClient(a.http)


def _target(p) -> None:
    p.add_argument("--grpc", help="gRPC target host:port (default: REST at --http)")
    p.add_argument("--http", default="http://127.0.0.1:8000", help="REST base URL")
    p.add_argument("--model", default="tiny")


# ---------------------------------------------------------------------------------------------- plan
def cmd_plan(a) -> None:
    from ..lab.plan import (
        TABLE_HEADER,
        ExpertPolicy,
        MPCPolicy,
        PlanConfig,
        RandomPolicy,
        RemoteWorld,
        SimWorld,
        eval_seeds,
        evaluate,
    )

    cfg = PlanConfig(candidates=a.candidates, horizon=a.horizon, gamma=a.gamma, lava_penalty=a.lava_penalty,
                     primitives=not a.no_primitives, futures=a.futures, seed=a.seed,
                     discard_uncertain=a.discard_uncertain)
    seeds = eval_seeds(a.episodes, a.seed0)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.verbose else None
    rows, t0 = [], time.time()
    shape = f"K={cfg.candidates}, H={cfg.horizon}" + (f", M={cfg.futures} futures" if cfg.futures > 1 else "") + (
        f", least confident {cfg.discard_uncertain:.0%} of futures dropped" if cfg.discard_uncertain else "")
    for name in a.policies.split(","):
        if name == "random":
            rows.append(evaluate("random", RandomPolicy(a.seed), seeds, a.max_steps, log=log, env=a.env))
        elif name == "served":
            world = RemoteWorld(_client(a), a.model, temperature=a.temperature, max_rows=a.max_rows,
                                tick_ms=a.tick_ms, crn=False if a.independent_futures else None)
            label = f"CEM planner on the served model ({shape}" + (f", tick {a.tick_ms} ms)" if a.tick_ms else ")")
            rows.append(evaluate(label, MPCPolicy(world, cfg), seeds, a.max_steps, cfg, log=log, env=a.env))
        elif name == "sim":
            label = f"same planner on the true simulator ({shape})"
            rows.append(evaluate(label, MPCPolicy(SimWorld(), cfg), seeds, a.max_steps, cfg, log=log, env=a.env))
        elif name == "expert":
            rows.append(evaluate("expert (BFS on the true state)", ExpertPolicy(), seeds, a.max_steps, log=log,
                                 env=a.env))
        else:
            raise SystemExit(f"unknown policy {name!r} (random, served, sim, expert)")
        print(rows[-1].row(), file=sys.stderr, flush=True)
    table = TABLE_HEADER + "\n" + "\n".join(r.row() for r in rows)
    print(table)
    if a.write:
        _write_results(Path(a.write), table, a, time.time() - t0)


def _write_results(path: Path, table: str, a, seconds: float) -> None:
    model = ""
    if a.card and Path(a.card).is_file():
        text = Path(a.card).read_text()
        sha = re.search(r"weights_sha256:\s*([0-9a-f]{64})", text)
        first = text.strip().splitlines()[0].lstrip("# ") if text.strip() else ""
        model = f"Model: `{a.card}` — {first}" + (f" (weights sha256 `{sha.group(1)[:16]}…`)" if sha else "") + ".\n"
    argv = " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("worldserve", "cli.py") else ""
    begin, end = _markers(a.env)
    block = (f"{begin}\n{model}Episodes: seeds {a.seed0}..{a.seed0 + a.episodes - 1} (held out), "
             f"max {a.max_steps} steps; measured {time.strftime('%Y-%m-%d')} in {seconds / 60:.1f} min.\n"
             + (f"Command: `worldserve {argv}`\n" if argv else "") + f"\n{table}\n{end}")
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old + ("\n" if old else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    print(f"wrote the results into {path}", file=sys.stderr)




# ---------------------------------------------------------------------------------------------- rollout
def cmd_rollout(a) -> None:
    from ..lab.rollout_view import predict_inprocess, real_rollout, strip_image, write_gif

    if a.context < 1:
        raise SystemExit("--context must be at least 1")
    given = [int(x) for x in a.actions.split(",")] if a.actions else None
    real, actions = real_rollout(a.seed, a.context - 1 + a.horizon, given)
    if len(actions) < a.context:
        raise SystemExit(f"need at least {a.context} actions (context - 1 + 1), got {len(actions)}")
    ctx, ctx_actions, future = real[: a.context], actions[: a.context - 1], actions[a.context - 1 :]
    if a.model_dir:
        pred = predict_inprocess(a.model_dir, ctx, ctx_actions, future, a.sample_seed, a.temperature)
    else:
        pred = _client(a).predict(a.model, ctx, future, context_actions=ctx_actions or None, seed=a.sample_seed,
                                  temperature=a.temperature)
    full = np.concatenate([ctx, pred])  # aligned with `real`
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        write_gif(out, real, full, a.context)
    else:
        strip_image(real, full, a.context, actions, a.scale).save(out)
    mse = ((real[a.context :].astype(np.float64) - pred) ** 2).mean(axis=(1, 2, 3))
    print(f"wrote {out}: seed {a.seed}, {a.context} context frames, {len(future)} predicted; "
          f"PSNR per step vs the real frames (dB): {' '.join(f'{psnr(m):.1f}' for m in mse)}")


# ---------------------------------------------------------------------------------------------- argparse
def _fraction(text: str) -> float:
    """argparse type: a fraction in [0, 1) (dropping every future would leave nothing to score)."""
    import argparse

    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return f


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="evaluate a remote MPC planner (CEM over Rollout) on the real environment")
    _target(p)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed0", type=int, default=2_000_000, help="first held-out layout seed")
    p.add_argument("--policies", default="random,served,sim,expert", help="comma list: random,served,sim,expert")
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--lava-penalty", type=float, default=1.0)
    p.add_argument("--no-primitives", action="store_true", help="CEM samples only (no L-shaped primitive library)")
    p.add_argument("--temperature", type=float, default=0.0, help="world-model sampling temperature")
    p.add_argument("--futures", type=int, default=1,
                   help="sampled futures per candidate (scored by their mean; use with --temperature 1)")
    p.add_argument("--independent-futures", action="store_true",
                   help="sampled rollouts without common random numbers: every candidate row its own noise (default "
                   "with --temperature > 0: noise keyed by the action prefix, equal prefixes computed once)")
    p.add_argument("--discard-uncertain", type=_fraction, default=0.0, metavar="FRACTION",
                   help="drop the least confident FRACTION of each tick's futures from their candidates' means (the "
                   "frames' confidence the server sends; a candidate keeps all its futures if all would go)")
    p.add_argument("--max-rows", type=int, default=64, help="candidate rows per Rollout (the server's max_candidates)")
    p.add_argument("--tick-ms", type=int, default=0, help="a fixed control rate: each tick's Rollouts are anytime "
                   "rollouts ending at what is left of this budget; the planner scores the steps reached (0: none)")
    p.add_argument("--env", choices=("minigrid", "dynamic"), default="minigrid",
                   help="the real environment (dynamic: random-walking obstacles, --model dynamic)")
    p.add_argument("--max-steps", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="planner / random-policy seed")
    p.add_argument("--write", help="put the table (and the command) into this markdown file, e.g. docs/planning.md")
    p.add_argument("--card", default="models/tiny/MODEL_CARD.md", help="model card named in --write output")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per episode on stderr")
    p.set_defaults(fn=cmd_plan)

    r = sub.add_parser("rollout", help="predicted frames beside the real environment's (PNG strip or GIF)")
    _target(r)
    r.add_argument("--model-dir", help="run the model in this process instead of calling a server")
    r.add_argument("--seed", type=int, default=2_000_003, help="environment layout seed")
    r.add_argument("--actions", help="comma list of actions (0 left, 1 right, 2 forward); default: "
                   "an epsilon-expert episode")
    r.add_argument("--context", type=int, default=4, help="real context frames given to the model")
    r.add_argument("--horizon", type=int, default=10, help="predicted steps")
    r.add_argument("--sample-seed", type=int, default=0)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--scale", type=int, default=2)
    r.add_argument("--out", default="rollout.png", help=".png (strip) or .gif (animation)")
    r.set_defaults(fn=cmd_rollout)
