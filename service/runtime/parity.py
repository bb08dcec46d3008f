"""Parity of a built backend with the eager reference: the check `worldserve export` runs after a build."""

from __future__ import annotations

import numpy as np
import torch

from ..model.dynamics import advance


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
    for _ in range(steps):
        if cfg.continuous:
            a = torch.rand(batch, cfg.action_dim, generator=g).to(dev) * 2 - 1
        else:
            a = torch.randint(0, cfg.n_actions, (batch,), generator=g).to(dev)
        l_ref, _, _ = ref.step(c_ref, slots, a)
        l_mod, _, _ = model.step(c_mod, slots, a)
        nxt = l_ref.argmax(-1)
        agree.append(float((l_mod.argmax(-1).to(dev) == nxt).float().mean()))
        diff = max(diff, float((l_mod.float().to(dev) - l_ref.float()).abs().max()))
        mse.append(float(((model.decode(nxt).float().cpu() - ref.decode(nxt).float().cpu()) ** 2).mean()))
        advance(c_ref, slots, nxt)
        advance(c_mod, slots, nxt)
    m = float(np.mean(mse))
    return {"token_agreement": float(np.mean(agree)), "max_logit_diff": diff,
            "frame_psnr": 100.0 if m <= 1e-10 else 10 * float(np.log10(255.0**2 / m))}
