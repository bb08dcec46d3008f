"""Predicted rollouts beside the real environment's: the real frames, the model run in this process, and the
two side by side as a labelled PNG strip or a GIF (what `worldserve rollout` writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def real_rollout(seed: int, n_actions: int, actions: list[int] | None, epsilon: float = 0.25):
    """Real frames uint8 [T+1, H, W, 3] and actions [T] (default: an epsilon-expert episode, padded)."""
    from .data.minigrid_env import Simulator, run_episode

    if actions is None:
        actions = run_episode(seed, epsilon, pad=n_actions)[1].tolist()
        rng = np.random.default_rng(seed)
        actions += rng.integers(0, 3, max(0, n_actions - len(actions))).tolist()
    actions = actions[:n_actions]
    sim = Simulator(seed)
    frames = [sim.frame()] + [sim.step(x)[0] for x in actions]
    return np.stack(frames), actions


def predict_inprocess(model_dir: str, context, context_actions, actions, seed: int, temperature: float):
    """The engine in this process (no server): predicted frames uint8 [T, H, W, 3]."""
    from ..engine.engine import Engine, complete
    from ..messages import RolloutRequest
    from ..model.io import load_model_dir
    from ..settings import EngineSettings

    model = load_model_dir(model_dir)
    eng = Engine(model, EngineSettings(max_slots=4))
    ca = np.asarray(context_actions, np.int64) if context_actions else None
    events = complete(eng, [RolloutRequest("rollout", model.spec.name, np.asarray(context),
                                           np.asarray([actions], np.int64), context_actions=ca, seed=seed,
                                           temperature=temperature)])
    if events[-1].message:
        raise RuntimeError(f"rollout failed: {events[-1].error.name}: {events[-1].message}")
    return np.stack([e.frame for e in sorted((e for e in events if not e.final), key=lambda e: e.step)])


def strip_image(real, pred, context: int, actions: list[int], scale: int = 2):
    """PIL image: row 1 the real frames, row 2 the model's (context frames are shared), labelled columns."""
    from PIL import Image, ImageDraw

    from .data.minigrid_env import ACTION_NAMES

    n, (h, w) = len(real), real.shape[1:3]
    fw, fh, pad, label_w, head = w * scale, h * scale, 4, 56, 16
    img = Image.new("RGB", (label_w + n * (fw + pad), head + 2 * (fh + pad)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for row, (name, frames) in enumerate((("real", real), ("model", pred))):
        y = head + row * (fh + pad)
        d.text((4, y + fh // 2 - 6), name, fill=(0, 0, 0))
        for i in range(n):
            f = frames[i] if i >= context else real[i]
            x = label_w + i * (fw + pad) + (pad if i >= context else 0)
            img.paste(Image.fromarray(f).resize((fw, fh), Image.NEAREST), (x, y))
    for i in range(n):
        x = label_w + i * (fw + pad) + (pad if i >= context else 0)
        text = "ctx" if i < context else f"+{i - context + 1} {ACTION_NAMES[actions[i - 1]]}"
        d.text((x + 2, 2), text, fill=(0, 0, 0) if i >= context else (120, 120, 120))
    return img


def write_gif(path: Path, real, pred, context: int, scale: int = 4, ms: int = 300) -> None:
    from PIL import Image

    frames = []
    for i in range(context - 1, len(real)):
        both = np.concatenate([real[i], np.full((real.shape[1], 2, 3), 255, np.uint8),
                               pred[i] if i >= context else real[i]], axis=1)
        frames.append(Image.fromarray(both).resize((both.shape[1] * scale, both.shape[0] * scale), Image.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)
