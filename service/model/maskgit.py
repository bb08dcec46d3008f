"""Within-frame decoding: a frame head that fills the next frame in passes (MaskGIT, as in Genie; or raster-order
autoregressive, as in IRIS / GAIA-1), and the plain-PyTorch reference sampler the engine is checked against.

The block-causal trunk (dynamics.py) runs ONCE per frame step. It leaves, for every position of the next frame, the
conditioning h [B, N, d] (the input of its own heads), which `WorldModel.step` stores per slot in the state. The
frame head is a small bidirectional transformer over the N positions of the next frame:

    x = cond(LN(h)) + tok_emb(partial) + local(5x5 cells of local_emb(partial)) + pos   # [B, N, dh]; MASK if unknown
    x = blocks(x)                                                   # full attention over the frame's N positions
    logits = trunk_logits(h) + out(LN(x))                           # [B, N, V]

It predicts a correction to the trunk's own per-token logits (`out` starts at zero, so an untrained head samples
exactly as the parallel model): what knowing some tokens of the frame says about the others (a ball seen in one of
its five possible cells is in none of the four others). Those five cells lie within two cells of each other, so the
5x5 window of every position (in narrow embeddings, dh/4 wide) sees all of a ball's cells directly.

Decoding one frame, per row (what `sample_frame` does, and what the engine does batched across requests):

    partial = 0, known = False everywhere                           # int64 [B, N], bool [B, N]
    for p in 0 .. P-1:
        logits = model.fill(state, slots, partial, known)           # one pass of the head; no trunk work
        partial, known = unmask_pass(logits, partial, known, schedule[p], temperature, keys, pass p)
    model.advance(state, slots, partial)                            # only the complete frame enters the KV window

`WorldModel.step` returns pass 0's logits (fill with nothing known) as its logits, so the first pass needs no fill.

MaskGIT's choice: every unknown position samples a token; the new tokens kept are those of highest confidence =
log p(sampled token) + choice_noise * temperature * Gumbel noise. Plain confidence defers the open cells (where a ball
may be) to the last passes, which then sample several of them at once, unaware of each other; more noise spreads
them over the passes (MaskGIT's own choice temperature is 4.5).

Schedules (tokens known after pass p of P, N tokens a frame): MaskGIT's cosine, ceil(N * (1 - cos(pi/2 (p+1)/P)))
with at least one new token a pass; autoregressive, min(N, (p+1) * tokens_per_pass) in raster order.

Randomness: counter-based (sampling.py), keyed by (seed, candidate, step, pass, token): pass p draws its tokens from
draw 2p+1 and its Gumbel noise from draw 2p+2 of the row's (seed, candidate, step) stream. Nothing depends on the
batch, so a frame is the same alone, in any batch, and with other rows at other passes in the same call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dynamics import KVCache
from .sampling import sample, token_uniform
from .spec import CONFIDENCES, SCHEDULES

# ---- the frame head -------------------------------------------------------------------------------------------
LOCAL = 5  # the window of cells each position of the frame head sees directly


def neighbourhood(e: torch.Tensor, grid: tuple[int, int], size: int = LOCAL) -> torch.Tensor:
    # e: [B, N, c] over an h x w grid (N = h * w) -> [B, N, size^2 c]: the size x size cells around each position
    # (zeros outside the grid)
    b, _, c = e.shape
    h, w = grid
    r = size // 2
    g = F.pad(e.reshape(b, h, w, c), (0, 0, r, r, r, r))  # [B, h+2r, w+2r, c]
    cells = [g[:, i : i + h, j : j + w] for i in range(size) for j in range(size)]
    return torch.cat(cells, -1).reshape(b, h * w, size * size * c)


class HeadBlock(nn.Module):
    """Pre-LN transformer block with full (bidirectional) attention over the N positions of one frame."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, d] -> [B, N, d]
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]; no mask: every position sees the frame
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class FrameHead(nn.Module):
    """Logits for every position of the next frame given the trunk's conditioning and the tokens known so far."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, v = cfg.head_d_model, cfg.tokens_per_frame, cfg.vocab_size
        self.grid = cfg.grid
        self.mask_id = v  # the token id of an unknown position
        self.cond_ln = nn.LayerNorm(cfg.d_model)
        self.cond = nn.Linear(cfg.d_model, d)
        self.tok_emb = nn.Embedding(v + 1, d)  # V tokens + MASK
        self.local_emb = nn.Embedding(v + 1, d // 4)  # narrow embeddings for the 5x5 window
        self.local = nn.Linear(LOCAL * LOCAL * (d // 4), d)
        self.pos_emb = nn.Parameter(torch.randn(n, d) * 0.02)
        self.blocks = nn.ModuleList(HeadBlock(d, cfg.head_heads, cfg.mlp_ratio) for _ in range(cfg.head_layers))
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, v)
        nn.init.zeros_(self.out.weight)  # starts as the trunk's own logits: the parallel model
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """h float [B, N, d_model] (the trunk's conditioning); tokens int64 [B, N] in [0, V] (V = MASK: unknown);
        base float [B, N, V] (the trunk's own logits of the frame) -> logits [B, N, V] (h's dtype)."""
        local = self.local(neighbourhood(self.local_emb(tokens), self.grid))  # [B, N, dh]
        x = self.cond(self.cond_ln(h)) + self.tok_emb(tokens) + local + self.pos_emb  # [B, N, dh]
        for blk in self.blocks:
            x = blk(x)
        return base + self.out(self.ln_f(x))


@dataclass
class DecodeState(KVCache):
    """The serving state of a model with a frame head: the KV cache plus every slot's conditioning of its next frame.

    cond: float [S, N, d_model], written by `step` (the trunk's one pass), read by every `fill` of that frame.
    """

    cond: torch.Tensor | None = None

    @classmethod
    def allocate(cls, cfg: ModelConfig, slots: int, device="cpu", dtype=torch.float32) -> DecodeState:
        kv = KVCache.allocate(cfg, slots, device, dtype)
        cond = torch.zeros(slots, cfg.tokens_per_frame, cfg.d_model, device=device, dtype=dtype)
        return cls(kv.k, kv.v, kv.last_tokens, kv.frames, cond)

    def fork(self, src: int, dst: torch.Tensor) -> None:
        super().fork(src, dst)
        self.cond[dst] = self.cond[src : src + 1].clone()


# ---- schedules ------------------------------------------------------------------------------------------------
def maskgit_schedule(n: int, passes: int) -> list[int]:
    """Tokens known after each of P passes: ceil(N * (1 - cos(pi/2 * (p+1)/P))), >= 1 new a pass, N after the last."""
    out, prev = [], 0
    for p in range(passes):
        k = math.ceil(n * (1.0 - math.cos(math.pi / 2 * (p + 1) / passes)) - 1e-9)
        prev = min(n, max(k, prev + 1))
        out.append(prev)
    out[-1] = n
    return out


def autoregressive_schedule(n: int, tokens_per_pass: int) -> list[int]:
    """Tokens known after each pass in raster order: tokens_per_pass more a pass, ceil(N / tokens_per_pass) passes."""
    return [min(n, (p + 1) * tokens_per_pass) for p in range(-(-n // tokens_per_pass))]


def sequential_schedule(n: int, passes: int) -> list[int]:
    """N - P + 1 tokens in the first pass (the confident ones), then one token a pass: the last P - 1 (the open
    ones: where a ball may be) are sampled one after the other, each knowing the ones before."""
    return [max(1, n - passes + 1 + p) if p < n else n for p in range(passes)]


def schedule(scheme: str, n: int, passes: int, tokens_per_pass: int = 0, shape: str = "cosine") -> list[int]:
    """The scheme's tokens known after each pass (its length is the number of passes). "parallel" = one pass.
    MaskGIT's shape: "cosine" (MaskGIT / Genie) or "sequential" (`sequential_schedule`)."""
    if scheme == "parallel":
        return [n]
    if scheme == "maskgit":
        if shape not in SCHEDULES:
            raise ValueError(f"unknown schedule {shape!r}")
        return maskgit_schedule(n, passes) if shape == "cosine" else sequential_schedule(n, passes)
    if scheme == "autoregressive":
        return autoregressive_schedule(n, tokens_per_pass or -(-n // passes))
    raise ValueError(f"unknown decoding scheme {scheme!r}")


# ---- one pass -------------------------------------------------------------------------------------------------
def unmask_pass(logits: torch.Tensor, partial: torch.Tensor, known: torch.Tensor, n_known_after: torch.Tensor,
                temperature: torch.Tensor, seed: torch.Tensor, candidate: torch.Tensor, step: torch.Tensor,
                pass_idx: torch.Tensor, order: str = "sampled",
                noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding pass for B rows, each at its own pass. A pure function: rows never interact.

    logits        float [B, N, V]  fill's logits for the rows' current partial frames
    partial       int64 [B, N]     tokens where known (anything elsewhere)
    known         bool  [B, N]
    n_known_after int64 [B]        tokens known after this pass, in [known.sum(1), N] (the schedule at the row's pass)
    temperature   float [B]        >= 0 (0: greedy tokens, confidence without noise)
    seed, candidate, step, pass_idx: int64 [B], the row's keys (pass_idx: which pass of the frame this is)
    order         a token at `temperature` for each position kept; which new ones are kept:
                  "sampled": the most confident, confidence = log p(sampled token) + noise * temperature * Gumbel
                  noise (MaskGIT / Genie; noise: MaskGIT's choice temperature, the model's spec.choice_noise).
                  "max": the same with log max_v p(v), the position's confidence before sampling: the choice does
                  not depend on the values drawn, so with a right head the frame is an exact sample ("sampled"
                  keeps likely values first and resamples the others: it leans to the mode). "max" and "raster"
                  choose first and draw only the kept positions (each one's token is the one drawing every
                  position would give it: keyed by its position).
                  "raster": the first unknown positions in raster order (autoregressive).
    -> partial int64 [B, N], known bool [B, N]: row b has exactly n_known_after[b] known tokens, the known ones
       unchanged; unknown positions hold 0.
       kept float32 [B]: the sum over the tokens this pass kept of their probability under the distribution they were
       sampled from (softmax(logits / t); greedy rows: t = 1): the engine sums it over a frame's passes and divides
       by N, the frame's confidence (RolloutEvent.confidence).
    """
    b, n, _ = logits.shape
    t = temperature.to(torch.float32)
    draw = 2 * pass_idx + 1  # this pass's token stream; 2 * pass_idx + 2: its Gumbel noise
    pos = torch.arange(n, device=logits.device)
    if order not in CONFIDENCES and order != "raster":
        raise ValueError(f"unknown order {order!r}")
    t_lp = torch.where(t > 0, t, torch.ones_like(t))[:, None, None]  # greedy rows: log p at temperature 1
    logp = torch.log_softmax(logits.float() / t_lp, -1)  # [B, N, V]
    tok = None
    if order == "raster":
        conf = -pos.to(torch.float32).expand(b, n)  # earlier positions first
    else:
        if order == "sampled":  # the choice ranks the values drawn: a token for every position first
            tok = sample(logits, t, seed, candidate, step, draw)  # int64 [B, N]
            lp = logp.gather(-1, tok[..., None]).squeeze(-1)  # [B, N] <= 0
        else:
            lp = logp.amax(-1)  # [B, N] <= 0
        u = token_uniform(seed, candidate, step, n, draw + 1)  # [B, N] in (0, 1)
        conf = lp + (noise * t)[:, None] * -torch.log(-torch.log(u))  # + temperature-scaled Gumbel noise
    conf = conf.masked_fill(known, float("inf"))  # the known tokens rank first and stay
    ranked = torch.sort(conf, dim=1, descending=True, stable=True).indices  # [B, N] positions, most confident first
    rank = torch.empty_like(ranked).scatter_(1, ranked, pos.expand(b, n))  # [B, N] each position's place
    new_known = (rank < n_known_after[:, None]) | known
    if tok is None:  # "max" / "raster" chose before drawing: only the positions kept now need a token
        tok = sample(logits, t, seed, candidate, step, draw, where=new_known & ~known)  # int64 [B, N]
    chosen = logp.gather(-1, tok[..., None]).squeeze(-1)  # [B, N] <= 0: log p of the token each position drew
    partial = torch.where(known, partial, torch.where(new_known, tok, torch.zeros_like(tok)))
    kept = torch.where(new_known & ~known, chosen.exp(), torch.zeros_like(chosen)).sum(1)  # float32 [B]
    return partial, new_known, kept


def unmask_pass_drawing_everything(logits, partial, known, after, t, seed, cand, step, pass_idx, order: str,
                                   noise: float = 1.0):
    """The plain reference of `unmask_pass` (same arguments and results): a token drawn at every position, then the
    choice, as the pass ran before "max" / "raster" drew only the positions they keep. Tests hold the two bit-equal;
    bench/unmask_pass.py times them."""
    b, n, _ = logits.shape
    draw = 2 * pass_idx + 1
    tok = sample(logits, t, seed, cand, step, draw)
    pos = torch.arange(n, device=logits.device)
    logp = torch.log_softmax(logits.float() / torch.where(t > 0, t, torch.ones_like(t))[:, None, None], -1)
    chosen = logp.gather(-1, tok[..., None]).squeeze(-1)
    if order == "raster":
        conf = -pos.to(torch.float32).expand(b, n)
    else:
        lp = chosen if order == "sampled" else logp.amax(-1)
        conf = lp + (noise * t)[:, None] * -torch.log(-torch.log(token_uniform(seed, cand, step, n, draw + 1)))
    ranked = torch.sort(conf.masked_fill(known, float("inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(ranked).scatter_(1, ranked, pos.expand(b, n))
    new_known = (rank < after[:, None]) | known
    out = torch.where(known, partial, torch.where(new_known, tok, torch.zeros_like(tok)))
    return out, new_known, torch.where(new_known & ~known, chosen.exp(), torch.zeros_like(chosen)).sum(1)


# ---- the reference sampler ------------------------------------------------------------------------------------
@torch.no_grad()
def sample_frame(model, state, slots: torch.Tensor, seed: torch.Tensor, candidate: torch.Tensor,
                 step: torch.Tensor, scheme: str | None = None, passes: int | None = None,
                 temperature: float | torch.Tensor | None = None, tokens_per_pass: int | None = None,
                 noise: float | None = None, shape: str | None = None,
                 confidence: str | None = None) -> torch.Tensor:
    """The next frame of every slot in `slots` [B], the passes one after the other: -> int64 [B, N].

    Call after `model.step(state, slots, actions)` (which leaves each slot's conditioning in the state) and before
    `model.advance(state, slots, tokens)`. seed, candidate, step: int64 [B]. scheme, passes, tokens_per_pass, noise
    (MaskGIT's choice noise), shape (its schedule), confidence: default the model's spec; temperature: the passes'
    temperature, float or float [B] (default the spec's decode_temperature, i.e. a request at temperature 1).
    """
    spec = model.spec
    scheme = scheme or spec.decoding
    passes = passes or spec.passes
    tpp = spec.tokens_per_pass if tokens_per_pass is None else tokens_per_pass
    b, n = slots.shape[0], spec.tokens_per_frame
    device = slots.device
    t = spec.decode_temperature if temperature is None else temperature
    t = torch.as_tensor(t, dtype=torch.float32, device=device).expand(b).contiguous()
    partial = torch.zeros(b, n, dtype=torch.int64, device=device)
    known = torch.zeros(b, n, dtype=torch.bool, device=device)
    order = "raster" if scheme == "autoregressive" else confidence or spec.confidence
    for p, k in enumerate(schedule(scheme, n, passes, tpp, shape or spec.schedule)):
        logits = model.fill(state, slots, partial, known)  # [B, N, V]
        after = torch.full((b,), k, dtype=torch.int64, device=device)
        partial, known, _ = unmask_pass(logits, partial, known, after, t, seed, candidate, step,
                                     torch.full((b,), p, dtype=torch.int64, device=device), order,
                                     spec.choice_noise if noise is None else noise)
    return partial
