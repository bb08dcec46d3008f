"""Parity of a served variant (another backend, precision or device) with a reference: the one lockstep loop of the
export check, the start-up quick gate (runtime/choose.py), the tests and the GPU check (bench/gpu_check_phases.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..model.dynamics import advance
from ..model.quality import psnr


def _device(m) -> torch.device:
    return next(m.parameters()).device


@contextmanager
def strict_fp32(on: bool):
    """TF32 off inside (a strict fp32 reference on CUDA; configure_device turns TF32 on for serving); no-op if off."""
    if not on:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on(x, dev):
    return None if x is None else x.to(dev)


def lockstep(ref, model, c_ref, c_mod, slots: torch.Tensor, actions, strict_ref: bool = False
             ) -> Iterator[tuple[tuple, tuple]]:
    """Step `ref` and `model` side by side from their prefilled caches, both fed ref's greedy tokens.

    The models may live on different devices: slots, actions and tokens go to each model's own device. actions: an
    iterable of step arguments, each an action tensor ([B] int | [B, A] float) or a tuple (action, known [B] bool).
    strict_ref: ref runs with TF32 off (strict fp32). Yields ((logits, reward, done) of ref, the same of model), each
    on its model's device, per step, before the caches advance, so a caller can compare outputs and caches at each
    step.
    """
    d_ref, d_mod = _device(ref), _device(model)
    s_ref, s_mod = slots.to(d_ref), slots.to(d_mod)
    for a in actions:
        args = a if isinstance(a, tuple) else (a,)
        with strict_fp32(strict_ref):
            out_ref = ref.step(c_ref, s_ref, *(_on(x, d_ref) for x in args))
        out_mod = model.step(c_mod, s_mod, *(_on(x, d_mod) for x in args))
        yield out_ref, out_mod
        nxt = out_ref[0].argmax(-1)  # int64 [B, N]
        advance(c_ref, s_ref, nxt)
        advance(c_mod, s_mod, nxt.to(d_mod))


@torch.no_grad()
def parity(ref, model, steps: int = 8, batch: int = 4, seed: int = 0, strict_ref: bool = False) -> dict[str, float]:
    """Greedy rollout of `ref` from a random context; `model` (another backend / precision / device) is fed the same
    tokens. strict_ref: ref runs with TF32 off.

    Returns token agreement of model's greedy tokens with ref's, max |logit diff| and decoded-frame PSNR (dB).
    """
    cfg = ref.cfg
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch * 2, cfg.height, cfg.width, 3), dtype=torch.uint8, generator=g)
    d_ref, d_mod = _device(ref), _device(model)
    with strict_fp32(strict_ref):
        tokens = ref.encode(frames.to(d_ref)).view(batch, 2, -1)  # int64 [B, 2, N]
    acts, known = ref.unknown_actions(batch, 1, "cpu")
    c_ref, c_mod = ref.allocate_cache(batch), model.allocate_cache(batch)
    slots = torch.arange(batch)
    for m, c, d in ((ref, c_ref, d_ref), (model, c_mod, d_mod)):
        with strict_fp32(strict_ref and m is ref):
            m.prefill(c, slots.to(d), tokens.to(d), acts.to(d), _on(known, d))
    if cfg.continuous:
        acts = [torch.rand(batch, cfg.action_dim, generator=g) * 2 - 1 for _ in range(steps)]  # float [B, A]
    else:
        acts = [torch.randint(0, cfg.n_actions, (batch,), generator=g) for _ in range(steps)]  # int64 [B]
    agree, diff, mse = [], 0.0, []
    for (l_ref, _, _), (l_mod, _, _) in lockstep(ref, model, c_ref, c_mod, slots, acts, strict_ref):
        l_ref, l_mod = l_ref.float().cpu(), l_mod.float().cpu()  # [B, N, V]
        nxt = l_ref.argmax(-1)  # int64 [B, N]
        agree.append(float((l_mod.argmax(-1) == nxt).float().mean()))
        diff = max(diff, float((l_mod - l_ref).abs().max()))
        with strict_fp32(strict_ref):
            f_ref = ref.decode(nxt.to(d_ref)).float().cpu()  # [B, H, W, 3]
        mse.append(float(((model.decode(nxt.to(d_mod)).float().cpu() - f_ref) ** 2).mean()))
    return {"token_agreement": float(np.mean(agree)), "max_logit_diff": diff, "frame_psnr": psnr(float(np.mean(mse)))}
