"""Batch-invariant, counter-based sampling (pure PyTorch).

Every random number is a hash of (seed, candidate, step, token): no generator state, so a rollout samples the
same tokens alone or inside any batch, and a rerun on another worker reproduces it exactly.

Greedy rows (temperature 0) take the argmax and nothing else. Sampled rows draw by inverse CDF with ONE uniform
per token: p = exp((logits - max) / t), r = u * sum(p), token = the first index whose running sum exceeds r.
That is an exact categorical sample (no truncation), and it needs one uniform per token instead of one per
vocabulary entry (what Gumbel-max needs: at a 64k vocabulary the hashes cost 50x the model's argmax).
The running sum is two-level: per-block sums of BLOCK entries, a scan over the blocks, then a scan inside the
chosen block only. Rows are processed in chunks that bound the scratch memory (no [B, N, V] temporary beyond the
logits themselves). Every operation is row-independent: elementwise maps, max, searchsorted, gather, scans along
a row, and sums over at most BLOCK contiguous entries (torch reduces a contiguous inner dimension per output row,
serially below its parallel grain), so a row's token does not depend on the batch or on the chunk it falls in.

    sample(logits float [B, N, V], temperature float [B], seed int64 [B], candidate int64 [B], step int64 [B],
           draw int64 [B] | None) -> int64 [B, N] in [0, V)

`sample_reference` is the same distribution written plainly (one cumsum over the whole row), the reference the
chunked path and the Triton kernel (worldserve.kernels.sampling) are tested against.
"""

from __future__ import annotations

import numpy as np
import torch

M32 = 0xFFFFFFFF
BLOCK = 512  # vocabulary entries per block of the two-level scan (the Triton kernel uses the same)
CHUNK_BYTES = 1 << 21  # float32 scratch per chunk of rows: stays in cache
GPU_CHUNK_BYTES = 1 << 28  # on a GPU: few chunks (each one is kernel launches), 256 MB of scratch at most


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 tensor holding uint32 values -> uint32 values (lowbias32 hash, Wellons)
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def token_uniform(seed: torch.Tensor, candidate: torch.Tensor, step: torch.Tensor, n_tokens: int,
                  draw: torch.Tensor | None = None) -> torch.Tensor:
    """seed, candidate, step: int64 [B] -> float32 [B, n_tokens] in (0, 1): one uniform per token.

    draw: int64 [B] >= 0 or None. None is the step's own stream (what `sample` draws by default); a draw index
    selects another stream of the same (seed, candidate, step), per row: the passes of a within-frame sampler
    (model/maskgit.py) draw their tokens and their Gumbel noise from draws 1, 2, 3, ... of the frame's step.
    """
    tok = torch.arange(n_tokens, device=seed.device, dtype=torch.int64)[None, :]
    row = _row_hash(seed, candidate, step)  # uint32 [B, 1]
    if draw is not None:
        row = _mix32(row ^ ((draw[:, None] * 0x9E3779B1 + 0x7F4A7C15) & M32))
    h = _mix32(row ^ ((tok * 0xC2B2AE35) & M32))
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 high bits -> (0, 1)


def is_sampled(temperature, latent_out: bool):
    """Whether a future is drawn rather than the greedy one: a latent model always draws its noise; a token model
    when its temperature > 0. temperature: a float (a request's) or float32 array (rows') -> bool or bool array.
    The one rule behind prefix sharing's exactness (engine/prefix.shareable) and the done draw (done_thresholds)."""
    if isinstance(temperature, np.ndarray):
        return latent_out | (temperature > 0)
    return latent_out or temperature > 0


def calibrate_done(logit: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """A done head's post-hoc calibration (config done_scale / done_bias, lab/calibrate.py): scale * logit + bias,
    float32; the identity is not even an op (an uncalibrated model's done stays bit for bit what it was)."""
    if scale == 1.0 and bias == 0.0:
        return logit
    return logit.float() * scale + bias


DONE_DRAW = 0x0D0E  # the stream of a step's end-of-world draw (within-frame passes use draws 1 .. 2P)


def done_thresholds(seed: torch.Tensor, step: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The done probability above which each row's world ends this step (stop_on_done). seed, step int64 [B],
    temperature float [B] (CPU) -> float32 [B] in (0, 1).

    Greedy rows (temperature 0): 0.5, the likelier outcome. Sampled rows: a uniform from the row's own (seed, step)
    stream, so a world ends with the probability its (calibrated) done head gives, and the end is the same alone, in
    any batch and on any worker; with common random numbers candidates with equal action prefixes end together."""
    zeros = torch.zeros_like(seed)
    u = token_uniform(seed, zeros, step, 1, torch.full_like(seed, DONE_DRAW))[:, 0]
    return torch.where(temperature > 0, u, torch.full_like(u, 0.5))


def _row_hash(seed: torch.Tensor, candidate: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    # int64 [B] keys -> uint32 [B, 1]: the per-row prefix of every counter-based stream
    seed = seed[:, None]
    h = _mix32((seed & M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & M32))
    h = _mix32(h ^ (candidate[:, None] & M32))
    return _mix32(h ^ ((step[:, None] * 0x85EBCA6B) & M32))


def counter_normal(seed: torch.Tensor, candidate: torch.Tensor, step: torch.Tensor, shape: tuple[int, ...],
                   draw: int = 0) -> torch.Tensor:
    """Standard normal noise float32 [B, *shape] from the rows' counter-based streams (Box-Muller).

    Element e of draw d hashes (row keys, d, e): independent of the batch, reproducible on any worker.
    """
    n = 1
    for d in shape:
        n *= d
    e = torch.arange(n, device=seed.device, dtype=torch.int64)[None, :]
    h = _mix32(_row_hash(seed, candidate, step) ^ ((draw * 0x27D4EB2F + 0x165667B1) & M32))
    h1 = _mix32(h ^ ((e * 0xC2B2AE35) & M32))
    h2 = _mix32(h1 ^ 0x5BD1E995)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # (0, 1)
    u2 = (h2 >> 8).to(torch.float32) / float(1 << 24)  # [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.reshape(seed.shape[0], *shape)


def block_size(vocab: int) -> int:
    # entries per block: BLOCK, or the vocabulary rounded up to a power of two when it is smaller
    return min(BLOCK, 1 << max(0, (vocab - 1).bit_length()))


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    # rows per chunk: the float32 scratch of a chunk stays near `budget` bytes
    return max(1, budget // (4 * vocab))


def _sample_rows(flat: torch.Tensor, sel: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
                 scratch: torch.Tensor) -> torch.Tensor:
    """One chunk: rows `sel` [R] of flat logits [*, V], t float32 [R] > 0, u float32 [R] in (0, 1) -> int64 [R].

    scratch: float32 [>= R, nb * bs], zero past column V (reused across chunks: no allocation per chunk).
    """
    r_, v = sel.shape[0], flat.shape[1]
    bs = block_size(v)
    nb = -(-v // bs)
    p = scratch[:r_]  # [R, nb * bs]
    if nb * bs == v and flat.dtype == torch.float32:
        torch.index_select(flat, 0, sel, out=p)  # gather straight into the scratch
    else:
        p[:, :v].copy_(flat.index_select(0, sel))
    pv = p[:, :v]
    inv_t = t.reciprocal()[:, None]  # [R, 1]
    torch.addcmul(-pv.amax(-1, keepdim=True) * inv_t, pv, inv_t, out=pv)  # (x - max) / t in one pass
    pv.exp_()  # (0, 1], the max entry is exactly 1
    if nb == 1:  # the vocabulary is one block: one scan
        c = p.cumsum(-1)  # [R, bs]
        j = torch.searchsorted(c, (u * c[:, -1])[:, None], right=True)
        return torch.minimum(j, bs - 1 - (p > 0).flip(-1).int().argmax(-1, keepdim=True)).squeeze(1)
    blocks = p.view(r_, nb, bs)
    csum = blocks.sum(-1).cumsum(-1)  # [R, nb] running mass at each block's end
    target = (u * csum[:, -1])[:, None]  # [R, 1], in [0, total)
    blk = torch.searchsorted(csum, target, right=True)  # first block whose running mass exceeds the target
    nonempty = torch.cat([csum[:, :1] > 0, csum[:, 1:] > csum[:, :-1]], -1)  # [R, nb] blocks with mass
    last_blk = nb - 1 - nonempty.flip(-1).int().argmax(-1, keepdim=True)
    blk = torch.minimum(blk, last_blk)  # target == total by rounding: the last block with mass
    prev = torch.where(blk > 0, csum.gather(1, (blk - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, blk[:, :, None].expand(r_, 1, bs)).squeeze(1)  # [R, bs]
    j = torch.searchsorted(inner.cumsum(-1), target - prev, right=True)  # [R, 1]
    last_j = bs - 1 - (inner > 0).flip(-1).int().argmax(-1, keepdim=True)
    return (blk * bs + torch.minimum(j, last_j)).squeeze(1)


def sample(logits, temperature, seed, candidate, step, draw=None, where=None):
    """logits float [B, N, V]; temperature float [B] (0 = greedy); seed/candidate/step int64 [B] -> int64 [B, N].

    draw: int64 [B] or None (the step's own stream): see `token_uniform`.
    where: bool [B, N] or None (every position): the positions that need a token; a sampled row draws only those (a
    position's token depends only on its own key, so it is the token drawing every position would give it) and
    holds 0 elsewhere (on a GPU every position is drawn and the others zeroed: the same result, no saving). MaskGIT
    passes that choose their positions before drawing (model/maskgit.unmask_pass) draw only the positions they keep.
    On the CPU greedy rows skip the draws (which rows are greedy is read on the host); on a GPU that read would be a
    synchronisation, so every row is drawn and greedy rows take their argmax by `where` (the same tokens)."""
    b, n, v = logits.shape
    if logits.is_cuda:  # every position drawn (no data-dependent shapes); `where` only zeroes the others
        out = _sample_all(logits, temperature, seed, candidate, step, draw)
        if where is None:
            return out
        return torch.where(where | (temperature <= 0)[:, None], out, torch.zeros_like(out))
    hot = temperature > 0  # [B] bool
    n_hot = int(hot.sum())
    if n_hot == 0:
        return logits.argmax(-1)  # greedy rows: argmax and nothing else
    out = torch.empty(b, n, dtype=torch.int64, device=logits.device)
    for i in (~hot).nonzero().squeeze(1).tolist():  # greedy rows of a mixed batch: argmax on views, no copy
        out[i] = logits[i].argmax(-1)
    rows = hot.nonzero().squeeze(1)  # [S] sampled batch rows
    u = token_uniform(seed[rows], candidate[rows], step[rows], n, None if draw is None else draw[rows]).reshape(-1)
    t = temperature[rows].float().clamp(min=1e-6).repeat_interleave(n)  # [S * N]
    flat = logits.reshape(b * n, v)  # a view for contiguous logits
    idx = (rows[:, None] * n + torch.arange(n, device=logits.device)).reshape(-1)  # [S * N] rows of flat
    if where is not None:  # only the positions asked for: their keys' uniforms and temperatures, the rest 0
        out[rows] = 0
        pick = where[rows].reshape(-1).nonzero().squeeze(1)  # [M] of S * N
        idx, u, t = idx[pick], u[pick], t[pick]
        if idx.shape[0] == 0:
            return out
    got = torch.empty(idx.shape[0], dtype=torch.int64, device=logits.device)
    size = chunk_rows(v)
    nb_bs = -(-v // block_size(v)) * block_size(v)
    scratch = torch.zeros(min(size, idx.shape[0]), nb_bs, dtype=torch.float32, device=logits.device)
    for i in range(0, idx.shape[0], size):  # chunks bound the scratch; every op below is row-independent
        sel = idx[i : i + size]
        got[i : i + sel.shape[0]] = _sample_rows(flat, sel, t[i : i + size], u[i : i + size], scratch)
    out.view(-1)[idx] = got  # idx: the flat positions drawn (every position of the hot rows, or those asked for)
    return out


def _sample_all(logits, temperature, seed, candidate, step, draw):
    # every row drawn, no data-dependent shapes (no host read: nothing waits for the device) -> int64 [B, N]
    b, n, v = logits.shape
    u = token_uniform(seed, candidate, step, n, draw).reshape(-1)  # [B * N]
    t = temperature.float().clamp(min=1e-6).repeat_interleave(n)  # [B * N]
    flat = logits.reshape(b * n, v)
    idx = torch.arange(b * n, device=logits.device)
    size = chunk_rows(v, GPU_CHUNK_BYTES)
    nb_bs = -(-v // block_size(v)) * block_size(v)
    scratch = torch.zeros(min(size, b * n), nb_bs, dtype=torch.float32, device=logits.device)
    got = torch.empty(b * n, dtype=torch.int64, device=logits.device)
    for i in range(0, b * n, size):
        sel = idx[i : i + size]
        got[i : i + sel.shape[0]] = _sample_rows(flat, sel, t[i : i + size], u[i : i + size], scratch)
    return torch.where((temperature > 0)[:, None], got.view(b, n), logits.argmax(-1))


_LANES = 64  # a multiple of two AVX-512 float32 vectors (and of two AVX2 ones): torch's vectorized loop covers it all


def rowwise_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) for x float [B] whose value for a row does not depend on B (batch invariance of `done`).

    torch's CPU elementwise loop computes 2 vectors at a time and the remaining tail with the scalar path, whose exp
    rounds differently in the last bit: torch.sigmoid over 16 rows (all tail on AVX-512) and over 64 rows (all
    vectors) give a row different bits. Padding to a multiple of _LANES sends every element through the vector path.
    On a GPU elementwise kernels are position-independent: plain sigmoid."""
    if x.is_cuda or x.numel() == 0:
        return torch.sigmoid(x)
    flat = x.reshape(-1)
    pad = -flat.numel() % _LANES
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    return torch.sigmoid(padded)[: flat.numel()].reshape(x.shape)


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """How sure the model was of each row's frame: the mean over its N tokens of the probability of the chosen token
    under the distribution it was sampled from, softmax(logits / t) (greedy rows, t = 0: t = 1, the model's own
    distribution). logits float [B, N, V]; tokens int64 [B, N]; temperature float [B] -> float32 [B] in [0, 1].

    On the device, no host read (part of the step's one packed copy); rows in chunks that bound the float32 scratch."""
    b, n, v = logits.shape
    inv_t = torch.where(temperature > 0, temperature.float(), 1.0).reciprocal()[:, None, None]  # [B, 1, 1]
    rows = max(1, (GPU_CHUNK_BYTES // 2 if logits.is_cuda else CHUNK_BYTES) // (4 * n * v))  # 2 fp32 temporaries
    out = []
    for i in range(0, b, rows):
        logp = torch.log_softmax(logits[i : i + rows].float() * inv_t[i : i + rows], -1)  # [R, N, V]
        out.append(logp.gather(-1, tokens[i : i + rows, :, None]).exp().mean((1, 2)))  # [R]
    return out[0] if len(out) == 1 else torch.cat(out)


def token_confidence_reference(logits, tokens, temperature):
    """The same, plainly: float64 softmax over the whole row, the chosen tokens' probabilities, their mean."""
    t = torch.where(temperature > 0, temperature.double(), torch.ones_like(temperature, dtype=torch.float64))
    p = torch.softmax(logits.double() / t[:, None, None], -1)
    return p.gather(-1, tokens[..., None]).squeeze(-1).mean(-1)


def sample_reference(logits, temperature, seed, candidate, step):
    """The same distribution, plainly: float64 softmax weights, one cumsum per row, first index above u * total."""
    b, n, v = logits.shape
    greedy = logits.argmax(-1)
    t = temperature.double().clamp(min=1e-6)[:, None, None]
    x = logits.double()
    p = ((x - x.amax(-1, keepdim=True)) / t).exp()  # [B, N, V]
    c = p.cumsum(-1)
    u = token_uniform(seed, candidate, step, n).double()[..., None]  # [B, N, 1]
    idx = torch.searchsorted(c, u * c[..., -1:], right=True).squeeze(-1).clamp(max=v - 1)
    return torch.where((temperature > 0)[:, None], idx, greedy)
