"""Parity of a built backend with the eager reference: the check `worldserve export` runs after a build."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..model.dynamics import advance
from ..model.quality import psnr


def lockstep(ref, model, c_ref, c_mod, slots: torch.Tensor, actions) -> Iterator[tuple[tuple, tuple]]:
    """Step `ref` and `model` side by side from their prefilled caches, both fed ref's greedy tokens.

    actions: an iterable of step arguments, each an action tensor ([B] int | [B, A] float) or a tuple
    (action, known [B] bool). Yields ((logits, reward, done) of ref, the same of model) per step, before
    the caches advance, so a caller can compare outputs and caches at each step. The one lockstep loop of
    the backend parity checks (export, tests, benches).
    """
    for a in actions:
        args = a if isinstance(a, tuple) else (a,)
        out_ref = ref.step(c_ref, slots, *args)
        out_mod = model.step(c_mod, slots, *args)
        yield out_ref, out_mod
        nxt = out_ref[0].argmax(-1)
        advance(c_ref, slots, nxt)
        advance(c_mod, slots, nxt)


def parity(ref, model, steps: int = 8, batch: int = 4, seed: int = 0) -> dict[str, float]:
    """Greedy rollout of `ref` from a random context; `model` (another backend) is fed the same tokens.

    Returns token agreement of model's greedy tokens with ref's, max |logit diff| and decoded-frame PSNR.
    """
    cfg = ref.cfg
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch * 2, cfg.height, cfg.width, 3), dtype=torch.uint8, generator=g)
    dev = next(ref.parameters()).device
    tokens = ref.encode(frames.to(dev)).view(batch, 2, -1)
    acts, known = ref.unknown_actions(batch, 1, dev)
    c_ref, c_mod = ref.allocate_cache(batch), model.allocate_cache(batch)
    slots = torch.arange(batch, device=dev)
    ref.prefill(c_ref, slots, tokens, acts, known)
    model.prefill(c_mod, slots, tokens, acts, known)
    agree, diff, mse = [], 0.0, []
    if cfg.continuous:
        acts = [torch.rand(batch, cfg.action_dim, generator=g).to(dev) * 2 - 1 for _ in range(steps)]
    else:
        acts = [torch.randint(0, cfg.n_actions, (batch,), generator=g).to(dev) for _ in range(steps)]
    for (l_ref, _, _), (l_mod, _, _) in lockstep(ref, model, c_ref, c_mod, slots, acts):
        nxt = l_ref.argmax(-1)
        agree.append(float((l_mod.argmax(-1).to(dev) == nxt).float().mean()))
        diff = max(diff, float((l_mod.float().to(dev) - l_ref.float()).abs().max()))
        mse.append(float(((model.decode(nxt).float().cpu() - ref.decode(nxt).float().cpu()) ** 2).mean()))
    m = float(np.mean(mse))
    return {"token_agreement": float(np.mean(agree)), "max_logit_diff": diff, "frame_psnr": psnr(m)}
