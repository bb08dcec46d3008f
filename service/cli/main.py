"""`worldserve` command line: collect, train, eval, fidelity, calibrate, serve, api, worker, rollout, plan, export."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from pathlib import Path


def cmd_collect(a) -> None:
    from ..lab.data.collect import HELDOUT_SEED0, collect, save

    save(collect(a.episodes, a.seed), Path(a.out) / "train.npz")
    save(collect(a.heldout, HELDOUT_SEED0, "heldout"), Path(a.out) / "heldout.npz")
    print(f"wrote {a.out}/train.npz ({a.episodes} episodes) and heldout.npz ({a.heldout})")


def _training_data(a) -> dict:
    """The episodes `worldserve train` learns from: {data}/train.npz (minigrid) or {data}/{env}-train.npz, collected
    first if absent."""
    from ..lab.data.collect import collect, load, save

    data_path = Path(a.data) / ("train.npz" if a.env == "minigrid" else f"{a.env}-train.npz")
    if not data_path.exists():
        save(collect(a.episodes, a.seed, env=a.env), data_path)
    return load(data_path)


def _train(a) -> None:
    """--out / --ckpt default by what is trained (a denoiser must not be named after the token model)."""
    if a.out is None:
        a.out = "models/denoiser" if a.arch == "denoiser" else "models/tiny"
    if a.ckpt is None:
        a.ckpt = f"runs/{Path(a.out).name}"
    (cmd_train_denoiser if a.arch == "denoiser" else cmd_train)(a)


def cmd_train(a) -> None:
    import torch

    from ..lab.train import CHANGED_WEIGHT, run
    from ..model.config import PRESETS
    from ..model.io import save_model_dir

    torch.set_num_threads(a.threads)
    data = _training_data(a)
    if a.decoding != "parallel":
        return _train_frame_head(a, data)
    t0 = time.time()
    cfg = PRESETS["tiny"] if a.env == "minigrid" else dataclasses.replace(PRESETS["tiny"], name=a.env)
    # a stochastic world needs a proper scoring rule (train.CHANGED_WEIGHT distorts the odds)
    weight = a.changed_weight if a.changed_weight is not None else (CHANGED_WEIGHT if a.env == "minigrid" else 1.0)
    init = None
    if a.init:
        from ..model.io import load_model_dir

        init = load_model_dir(a.init)  # fit() puts the dynamics in training mode
    model = run(data, Path(a.ckpt), cfg, a.tok_steps, a.dyn_steps, a.batch, a.seed,
                a.time_budget_min * 60 if a.time_budget_min else None, weight, init, a.lr)
    minutes = (time.time() - t0) / 60
    n_eps = len(data["frame_offsets"]) - 1
    env_line = "" if a.env == "minigrid" else (
        "\n- Stochastic: 2 blue balls random-walk after every action (stay / 4 moves, uniform); a ball moving onto"
        " the agent or the agent walking into one is a collision: done, reward -1.")
    card = f"""# worldserve {cfg.name} — MiniGrid random-layout world model

- Environment: MiniGrid (pip `minigrid`), 8x8 grid with random walls, lava, goal and start pose per episode,
  rendered full-grid at 64x64 (8 px per cell, one token per cell). Actions: left, right, forward.{env_line}
- Training data: {n_eps} episodes, seeds {a.seed}..{a.seed + n_eps - 1}, epsilon-expert behaviour policy
  (epsilon 0.05 / 0.25 / 0.5 / 1.0 by seed mod 4: near-expert, noisy and random episodes), {len(data['frames'])} frames.
- Held-out evaluation: fresh seeds from 1,000,000 on (never trained on).
- Training: `worldserve train --env {a.env} --tok-steps {a.tok_steps} --dyn-steps {a.dyn_steps} --batch {a.batch} \
  --seed {a.seed}`
  on {a.threads} CPU threads, {minutes:.1f} minutes (tokenizer + dynamics).
- Architecture: patch VQ tokenizer ({model.cfg.codebook_size} codes, k-means over training patches),
  block-causal transformer d={model.cfg.d_model} L={model.cfg.n_layers} H={model.cfg.n_heads},
  window {model.cfg.window} frames.
- Parameters: {model.param_counts()}
"""
    digest = save_model_dir(model, Path(a.out), card)
    print(f"saved {a.out} (sha256 {digest[:16]}…) after {minutes:.1f} min")


def _train_frame_head(a, data: dict) -> None:
    """`worldserve train --decoding maskgit|autoregressive`: fine-tune --init (default models/dynamic) with a
    within-frame decoding head (lab/train_maskgit.py); the card records the command and the training minutes."""
    from ..lab.train import ckpt_progress
    from ..lab.train_maskgit import run, training_seconds
    from ..model.io import load_model_dir, save_model_dir
    from ..model.maskgit import LOCAL

    init_dir = a.init or "models/dynamic"
    name = Path(a.out).name
    t0 = time.time()
    model = run(data, Path(a.ckpt), load_model_dir(init_dir), a.dyn_steps, a.batch, a.seed, a.lr,
                a.trunk_lr_scale, a.time_budget_min * 60 if a.time_budget_min else None, name,
                a.uncertain_weight, decoding=a.decoding, passes=a.passes, head_layers=a.head_layers,
                head_d_model=a.head_d, decode_temperature=a.decode_temperature, tokens_per_pass=a.tokens_per_pass,
                choice_noise=a.choice_noise, schedule=a.schedule, confidence=a.confidence)
    steps = ckpt_progress(Path(a.ckpt) / "maskgit.pt")[0]
    minutes = training_seconds(Path(a.ckpt)) / 60
    cfg, n_eps = model.cfg, len(data["frame_offsets"]) - 1
    tpp = f", {cfg.tokens_per_pass} tokens a pass" if cfg.tokens_per_pass else ""
    if a.trunk_lr_scale > 0:
        trunk = f"its tokenizer frozen, its trunk fine-tuned at {a.trunk_lr_scale:g} x the head's learning rate"
        losses = "), plus the trunk's per-token (x0.5), reward and done losses"
    else:  # lab/train_maskgit.run: the trunk's conditioning of every training frame computed once, as served
        trunk = ("its tokenizer and trunk frozen: the trunk's conditioning of every training frame computed once, as "
                 "served (cached steps, up to 8 frames of context)")
        losses = f"); {a.batch * cfg.window} frame pairs a step"
    command = (f"worldserve train --env {a.env} --decoding {a.decoding} --init {init_dir} --passes {a.passes} "
               f"--schedule {a.schedule} --confidence {a.confidence} --choice-noise {a.choice_noise:g} "
               f"--head-layers {a.head_layers} --head-d {a.head_d} "
               f"--dyn-steps {a.dyn_steps} --batch {a.batch} --lr {a.lr:g} --trunk-lr-scale {a.trunk_lr_scale:g} "
               f"--uncertain-weight {a.uncertain_weight:g} --seed {a.seed} --threads {a.threads} --ckpt {a.ckpt} "
               f"--out {a.out}" + (f" --time-budget-min {a.time_budget_min:g}" if a.time_budget_min else ""))
    bullets = [
        f"Environment: the stochastic MiniGrid world of `{init_dir}` (8x8 random layouts, 64x64, one token per cell; "
        "2 blue balls random-walk after every action; a collision ends the episode with reward -1). Actions: left, "
        "right, forward.",
        f"Decoding: `{cfg.decoding}`, {cfg.passes} passes by default{tpp}, schedule `{cfg.schedule}`, confidence "
        f"`{cfg.confidence}`, choice noise {cfg.choice_noise:g}, at {cfg.decode_temperature:g} x the request's "
        "temperature (service/model/maskgit.py). The trunk runs once per frame; the frame head fills the frame in "
        "passes.",
        f"Made from `{init_dir}` ({trunk}) with a new frame head: a bidirectional transformer over the frame's "
        f"{cfg.tokens_per_frame} positions, {cfg.head_layers} layers, d={cfg.head_d_model}, {cfg.head_heads} heads, "
        "input = the trunk's conditioning + the partial frame's tokens (MASK where unknown) + a "
        f"{LOCAL}x{LOCAL} window of narrow embeddings of them + position; it predicts a correction to the trunk's "
        "logits (zero at the start: the parallel model). Loss "
        "(Genie's recipe): per frame pair, a random fraction of the next frame's tokens masked (cosine schedule, at "
        "least one), cross-entropy on the masked positions (weighted 1 + "
        f"{a.uncertain_weight:g} x (1 - the trunk's top probability){losses}.",
        f"Training data: {n_eps} episodes of the dynamic world (seeds {a.seed}..{a.seed + n_eps - 1}, epsilon-expert "
        f"behaviour, `{a.data}/{a.env}-train.npz`), {len(data['frames'])} frames; held-out evaluation from seed "
        "1,000,000 on.",
        f"Training: `{command}`: {steps} steps on {a.threads} CPU threads (shared with other work), {minutes:.1f} "
        "minutes in all (the frozen trunk's conditioning included, summed over resumes; checkpoints every 100 steps).",
        f"Parameters: {model.param_counts()}",
    ]
    card = (f"# worldserve {cfg.name} — the dynamic world model with a within-frame decoding head ({cfg.decoding})\n\n"
            + "\n".join(textwrap.fill(b, 118, initial_indent="- ", subsequent_indent="  ", break_long_words=False,
                                       break_on_hyphens=False) for b in bullets) + "\n")
    digest = save_model_dir(model, Path(a.out), card)
    print(f"saved {a.out} (sha256 {digest[:16]}…) after {minutes:.1f} min of training ({time.time() - t0:.0f} s now)")


def cmd_train_denoiser(a) -> None:
    import torch

    from ..lab.train_denoiser import run
    from ..model.denoiser import DenoiserConfig
    from ..model.io import save_model_dir

    torch.set_num_threads(a.threads)
    data = _training_data(a)
    t0 = time.time()
    cfg = DenoiserConfig(name=Path(a.out).name)
    budget = a.time_budget_min * 60 if a.time_budget_min else None
    model, stats = run(data, Path(a.ckpt), cfg, a.ae_steps, a.dyn_steps, a.batch, a.seed, budget)
    minutes = (time.time() - t0) / 60
    n_eps = len(data["frame_offsets"]) - 1
    env_flag = "" if a.env == "minigrid" else f" --env {a.env} --out {a.out}"
    world = ("as `tiny` (MiniGrid random layouts, 64x64, actions left/right/forward)" if a.env == "minigrid" else
             "the stochastic world of `dynamic` (MiniGrid random layouts, 64x64, actions left/right/forward; 2 blue "
             "balls random-walk after every action, a collision ends the episode with reward -1)")
    card = f"""# worldserve {cfg.name} — MiniGrid continuous-latent (denoising) world model

- Architecture `denoiser` (worldserve.model.denoiser): per-patch MLP autoencoder to a {cfg.latent_ch}-channel
  8x8 latent grid; the next latent is denoised in {cfg.denoise_steps} Euler steps (EDM preconditioning, Karras
  schedule sigma {cfg.sigma_max} -> {cfg.sigma_min}) by a residual conv net ({cfg.n_blocks} blocks x {cfg.channels}
  channels, FiLM on noise level + action) conditioned on the last {cfg.context} frame latents; reward and done
  heads over (context, next latent, action). No tokens; the noise comes from the engine's counter-based streams.
- Environment and data: {world}: {n_eps} episodes,
  seeds {a.seed}..{a.seed + n_eps - 1}, epsilon-expert behaviour; held-out seeds from 1,000,000 on.
- Training: `worldserve train --arch denoiser{env_flag} --ae-steps {a.ae_steps} --dyn-steps {a.dyn_steps}
  --batch {a.batch} --seed {a.seed}` on {a.threads} CPU threads, {minutes:.1f} minutes
  ({stats['denoiser_steps']} denoiser steps).
  Autoencoder: {stats['distinct_patches']} distinct training patches, {100 * stats['exact_patches']:.1f}% exact.
- Parameters: {model.param_counts()}
"""
    digest = save_model_dir(model, Path(a.out), card)
    print(f"saved {a.out} (sha256 {digest[:16]}…) after {minutes:.1f} min")


def cmd_eval(a) -> None:
    import torch

    from ..lab.evaluate import evaluate_dir

    torch.set_num_threads(a.threads)
    try:
        ok, why = evaluate_dir(Path(a.model_dir), a.episodes, write_card=not a.no_card, variant=a.variant, env=a.env,
                               drift_horizon=a.drift, rare_states=a.rare_states, k=a.k, world_k=a.world_k)
    except ValueError as e:  # an unknown knob setting
        raise SystemExit(f"worldserve eval: {e}") from None
    if not ok:
        sys.exit(f"worldserve eval: {a.variant} FAILS: {why}")


def cmd_fidelity(a) -> None:
    import torch

    from ..lab.fidelity import fidelity_dir

    torch.set_num_threads(a.threads)
    if a.knobs:  # joint fidelity against the speed knobs (lab/knobs.py)
        from ..lab.knobs import knobs_dir

        knobs = None if a.knobs == "default" else a.knobs.split(",")
        command = (
            f"worldserve fidelity {a.model_dir} --knobs {a.knobs} --states {a.states} --k {a.k} --rare-states "
            f"{a.rare_states} --rare-k {a.rare_k or a.k} --world-k {a.world_k}"
            + (f" --baseline {a.baseline}" if a.baseline else ""))
        knobs_dir(Path(a.model_dir), knobs, a.baseline, a.states, a.k, a.rare_states, a.world_k, not a.no_card,
                  command, a.rare_k, a.jobs)
        return
    fidelity_dir(Path(a.model_dir), a.states, a.k, a.variants.split(","), a.rare_states, not a.no_card)


def cmd_calibrate(a) -> None:
    import torch

    from ..lab.calibrate import calibrate_dir

    torch.set_num_threads(a.threads)
    command = (f"worldserve calibrate {a.model_dir} --states {a.states} --rare-states {a.rare_states} --k {a.k} "
               f"--world-k {a.world_k} --seed {a.seed} --threads {a.threads}")
    calibrate_dir(Path(a.model_dir), a.states, a.rare_states, a.k, a.world_k, a.seed, not a.no_write, command)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="worldserve", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("collect", help="collect MiniGrid episodes")
    c.add_argument("--episodes", type=int, default=2000)
    c.add_argument("--heldout", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="data")
    c.set_defaults(fn=cmd_collect)

    t = sub.add_parser("train", help="train the tiny model (tokenizer, then dynamics); resumable")
    t.add_argument("--data", default="data")
    t.add_argument("--episodes", type=int, default=2000)
    t.add_argument("--ckpt", default=None, help="checkpoints (default runs/<the --out directory's name>)")
    t.add_argument("--out", default=None, help="the model directory (default models/tiny; --arch denoiser: "
                   "models/denoiser)")
    t.add_argument("--tok-steps", type=int, default=1500, help="FSQ tokenizers only (patch VQ is fitted by k-means)")
    t.add_argument("--dyn-steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--env", choices=("minigrid", "dynamic"), default="minigrid",
                   help="dynamic: obstacles that random-walk (a stochastic world; then --out models/dynamic)")
    t.add_argument("--arch", choices=("tiny", "denoiser"), default="tiny",
                   help="tiny: token model; denoiser: continuous-latent denoising model (then --out models/denoiser)")
    t.add_argument("--ae-steps", type=int, default=3000, help="denoiser: autoencoder steps")
    t.add_argument("--time-budget-min", type=float, default=0, help="stop the dynamics stage after this (minutes)")
    t.add_argument("--changed-weight", type=float, default=None,
                   help="loss weight of tokens that change (default 10 for minigrid, 1 for a stochastic world)")
    t.add_argument("--init", help="start from this model directory (its tokenizer and weights): a fine-tune")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the dynamics stage")
    t.add_argument("--decoding", choices=("parallel", "maskgit", "autoregressive"), default="parallel",
                   help="maskgit | autoregressive: fine-tune --init (default models/dynamic) with a within-frame "
                   "decoding head (masked-token prediction; then --out models/maskgit)")
    t.add_argument("--passes", type=int, default=8, help="frame head: the default number of decoding passes")
    t.add_argument("--tokens-per-pass", type=int, default=0, help="frame head, autoregressive: tokens a pass")
    t.add_argument("--head-layers", type=int, default=2, help="frame head: transformer layers")
    t.add_argument("--head-d", type=int, default=128, help="frame head: width")
    t.add_argument("--decode-temperature", type=float, default=1.0,
                   help="frame head: the passes' temperature at a request temperature of 1")
    t.add_argument("--trunk-lr-scale", type=float, default=0.1,
                   help="frame head: the trunk's learning rate as a fraction of --lr (0: frozen, its conditioning "
                   "computed once: much faster)")
    t.add_argument("--choice-noise", type=float, default=1.0,
                   help="frame head, maskgit: Gumbel noise of the confidence ranking, x the temperature")
    t.add_argument("--schedule", choices=("cosine", "sequential"), default="cosine",
                   help="frame head, maskgit: tokens known after each pass (sequential: N - P + 1, then one a pass)")
    t.add_argument("--confidence", choices=("sampled", "max"), default="sampled",
                   help="frame head, maskgit: rank by log p of the token drawn (MaskGIT) or log max p")
    t.add_argument("--uncertain-weight", type=float, default=0.0,
                   help="frame head: masked positions weigh 1 + this x (1 - the trunk's top probability there)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a model directory on held-out episodes")
    e.add_argument("model_dir")
    e.add_argument("--episodes", type=int, default=64)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--variant", default="fp32",
                   help="a knob setting compared to fp32: a precision (int8, bf16, ...), decoding knobs of a "
                   "frame-head model (passes=4, decode_temperature=0.8, ...) or both joined by '+'; on --env dynamic "
                   "it fails when its rare-collision rate leaves +-20 %% of the world's")
    e.add_argument("--rare-states", type=int, default=8, help="--env dynamic: states for the rare-collision gate")
    e.add_argument("--k", type=int, default=256, help="--env dynamic: sampled futures per rare state")
    e.add_argument("--world-k", type=int, default=1024, help="--env dynamic: simulator futures per rare state")
    e.add_argument("--no-card", action="store_true", help="do not write the table into the model card")
    e.add_argument("--env", choices=("minigrid", "dynamic"), default="minigrid", help="the world of the episodes")
    e.add_argument("--drift", type=int, default=0, metavar="H",
                   help="also the open-loop drift curve to H steps (e.g. 64 = 8x the window), into the card")
    e.set_defaults(fn=cmd_eval)

    f = sub.add_parser("fidelity", help="sampled futures vs the simulator's (stochastic world): TV, calibration, "
                       "rare events by precision")
    f.add_argument("model_dir")
    f.add_argument("--states", type=int, default=32)
    f.add_argument("--k", type=int, default=256, help="sampled futures per state")
    f.add_argument("--rare-states", type=int, default=16, help="states for the rare-event gate (0: skip)")
    f.add_argument("--variants", default="fp32,int8,bf16")
    f.add_argument("--knobs", default="", help="'default' or comma-separated knob settings (passes=4, bf16, "
                   "int8+passes=8, ...): the joint-fidelity table against the speed knobs, through the engine "
                   "(lab/knobs.py), into the card's 'knobs' section")
    f.add_argument("--baseline", default="", help="--knobs: a parallel model of the same world as the first row "
                   "(e.g. models/dynamic); its card gets the table too")
    f.add_argument("--world-k", type=int, default=1024, help="--knobs: simulator futures per rare state")
    f.add_argument("--rare-k", type=int, default=0, help="--knobs: sampled futures per rare state (0: --k)")
    f.add_argument("--jobs", type=int, default=1, help="--knobs: measure the rows in this many worker processes (one "
                   "torch thread each; the same figures as one process)")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--no-card", action="store_true")
    f.set_defaults(fn=cmd_fidelity)

    c = sub.add_parser("calibrate", help="fit the done head's calibration (Platt scaling) of a model of the "
                       "stochastic world on its own sampled futures vs the simulator's episode ends; into config.json")
    c.add_argument("model_dir")
    c.add_argument("--states", type=int, default=48, help="calibration states of every risk (seeds from 500,000)")
    c.add_argument("--rare-states", type=int, default=24, help="calibration states chosen as the rare-collision "
                   "evaluation chooses its own (world p in (0, 5 %%]; seeds from 550,000)")
    c.add_argument("--k", type=int, default=32, help="sampled futures per state, through the engine")
    c.add_argument("--world-k", type=int, default=512, help="simulator futures per state")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--no-write", action="store_true", help="print the fit; leave config.json and the card alone")
    c.set_defaults(fn=cmd_calibrate)

    from . import plan as cli_plan
    from . import runtime as cli_runtime
    from . import serve as cli_serve

    cli_serve.add_commands(sub)  # serve, api, worker
    cli_runtime.add_commands(sub)  # export, quantize
    cli_plan.add_commands(sub)  # plan, rollout
    args = p.parse_args(argv)
    from ..model.config import ConfigurationError

    try:
        args.fn(args)
    except ConfigurationError as e:  # a configuration that cannot serve: its message, no traceback
        raise SystemExit(f"worldserve {args.cmd}: {e}") from None


if __name__ == "__main__":
    main()
