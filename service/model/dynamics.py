"""Block-causal dynamics transformer with a static, sliding-window KV cache.

Sequence layout: frame t contributes N tokens. The input at frame t is
    tok_emb(z_t) + pos_emb[n] + act_emb(a_t)                       # [B, N, d]
where a_t is the action taken *after* observing frame t. The outputs at frame t predict every
token of frame t+1 in one pass (logits [B, N, V]) plus the reward and done of taking a_t (the done logit through
the config's post-hoc calibration, done_scale * logit + done_bias: identity unless lab/calibrate.py fitted one).
Attention is block-causal with a sliding window: a token of frame t attends to all tokens of
frames t-W+1 .. t. Time enters through rotary embeddings over the frame index only (relative,
so the ring-buffer cache can run forever); space through a learned per-token embedding.

Serving path (all shapes static per slot):
    prefill(tokens [B, C, N], actions [B, C]) -> keys/values for C frames, written into the cache
    step(cache, slots [B], tokens [B, N], actions) -> logits [B, N, V], reward [B], done_logit [B]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .sampling import calibrate_done


def rope_tables(frame_idx: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    # frame_idx: int64 [...] -> cos, sin float32 [..., head_dim // 2]
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=frame_idx.device, dtype=torch.float32) / head_dim))
    ang = frame_idx.to(torch.float32).unsqueeze(-1) * inv
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., hd]; cos/sin broadcastable to [..., hd/2]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    if x.dtype != torch.float32:  # the same products and sums on contiguous rows (bf16 on the CPU: 2x faster)
        return apply_rope_pairs(x, c, s)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2)


def apply_rope_pairs(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # x * [c0, c0, c1, c1, ...] + [x1, x0, x3, x2, ...] * [-s0, s0, -s1, s1, ...]: bit-equal to apply_rope
    # (a * b + c * -d == a * b - c * d in IEEE arithmetic), without strided halves and the final stack
    cf = torch.stack((c, c), -1).flatten(-2)
    sf = torch.stack((-s, s), -1).flatten(-2)
    return x * cf + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sf


def rowwise_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """lin(x) for x [..., K] -> [..., out] as products and a contiguous sum over K for each output: batch-invariant.

    A GEMM whose M is the batch picks its kernel by M: on the CPU at base's sizes a row's continuous-action embedding
    rounds differently at M = 1, 2-3 and >= 4 (1e-6 in the logits, 6e-8 in the reward), so a rollout alone and in a
    batch differed. The small layers whose M is the batch (continuous actions, the reward / done heads) use this;
    K x out is small there (4 x d, d x 1)."""
    return (x.to(lin.weight.dtype).unsqueeze(-2) * lin.weight).sum(-1) + lin.bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, Q, hd], k / v [B, H, S, hd] (any strides), mask bool broadcastable to [B, 1, Q, S] (True = attend)
    -> [B, H, Q, hd].

    F.scaled_dot_product_attention on every path. Its CPU flash kernel (torch 2.13) reads strided keys / values in
    place, accumulates in fp32 and never writes the [B*H, Q, S] scores. It replaced a bf16 form written as two oneDNN
    bmm's around a softmax, which had measured 1.4x faster than the flash kernel on a CPU with AVX-512 BF16 and no
    AMX; on a Xeon with AMX (stop 30's machine) the flash kernel is faster at every size tiny serves
    (bench/step_ab.py, bench/reports/step_ab*.md) and 4x closer to the fp32 result. Batch-invariant: a row alone
    and in any batch gives the same bits (tests/unit/test_cpu_fast.py).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)

    def qkv_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # x: [B, S, d]; cos/sin: [B or 1, S, hd/2] -> q, k, v: [B, H, S, hd] (q, k rotated)
        b, s, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], cos[:, :, None, None], sin[:, :, None, None]).unbind(2)  # one pass for both
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    def finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        # att: [B, H, S, hd] -> residual updates on x [B, S, d]
        b, _, s, _ = att.shape
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@dataclass
class KVCache:
    """Static per-slot cache. Ring buffer of W frames per slot.

    k, v:        [L, S, W, N, d]  keys (already rotated) / values
    last_tokens: int64 [S, N]     tokens of the newest frame, not yet in the cache (input of the next step)
    frames:      int64 [S]        frames written so far (the next step writes frame index `frames`)
    """

    k: torch.Tensor
    v: torch.Tensor
    last_tokens: torch.Tensor
    frames: torch.Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, slots: int, device="cpu", dtype=torch.float32) -> KVCache:
        shape = (cfg.n_layers, slots, cfg.window, cfg.tokens_per_frame, cfg.d_model)
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            last_tokens=torch.zeros(slots, cfg.tokens_per_frame, dtype=torch.int64, device=device),
            frames=torch.zeros(slots, dtype=torch.int64, device=device),
        )

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def fork(self, src: int, dst: torch.Tensor) -> None:
        # copy slot `src` into every slot of dst [K] (prefill once, sample K candidates)
        self.k[:, dst] = self.k[:, src : src + 1].clone()
        self.v[:, dst] = self.v[:, src : src + 1].clone()
        self.last_tokens[dst] = self.last_tokens[src].clone()
        self.frames[dst] = self.frames[src].clone()


class Dynamics(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.tokens_per_frame
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.randn(n, d) * 0.02)
        # each token also sees its 3x3 neighbourhood of cells in the same frame (a 3x3 conv as one matmul):
        # "the agent next to me faces me and moves forward" is local, and absolute position embeddings
        # alone left the model predicting moves wrong most of the time (84 % of forward moves at step 900)
        self.local = nn.Linear(9 * d, d)
        if cfg.continuous:
            self.act_emb = nn.Linear(cfg.action_dim, d)
            self.act_unknown = nn.Parameter(torch.zeros(d))
        else:
            self.act_emb = nn.Embedding(cfg.n_actions + 1, d)  # last index: "unknown" (context without actions)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size)
        self.reward_head = nn.Linear(d, 1)
        self.done_head = nn.Linear(d, 1)

    # ---- embeddings -------------------------------------------------------------------------
    def embed_actions(self, actions: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        # discrete: int64 [...] (n_actions = unknown); continuous: float [..., A] + known bool [...]
        if not self.cfg.continuous:
            return self.act_emb(actions)
        e = rowwise_linear(actions, self.act_emb)  # not a GEMM over the batch: batch-invariant
        if known is not None:
            e = torch.where(known.unsqueeze(-1), e, self.act_unknown.to(e.dtype))
        return e

    def neighbourhood(self, e: torch.Tensor) -> torch.Tensor:
        # e: [B, T, N, d] -> [B, T, N, 9d]: the 3x3 cells around each token (zeros past the border)
        b, t, _, d = e.shape
        h, w = self.cfg.grid
        g = F.pad(e.reshape(b, t, h, w, d), (0, 0, 1, 1, 1, 1))  # [B, T, h+2, w+2, d]
        cells = [g[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)]  # 9 x [B, T, h, w, d]
        return torch.cat(cells, -1).reshape(b, t, h * w, 9 * d)

    def embed(self, tokens: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        # tokens: int64 [B, T, N]; act: [B, T, d] -> [B, T, N, d]
        e = self.tok_emb(tokens)
        return e + self.local(self.neighbourhood(e)) + self.pos_emb + act.unsqueeze(2)

    def heads(self, h: torch.Tensor):
        # h: [B, T, N, d] -> logits [B, T, N, V] (model dtype), reward [B, T], done_logit [B, T] (float32 whatever
        # the model dtype: small, and callers turn them into numbers)
        h = self.ln_f(h)
        pooled = h.mean(2)  # [B, T, d]; the heads below are not GEMMs over the batch (rowwise_linear)
        done = rowwise_linear(pooled, self.done_head).squeeze(-1).float()  # [B, T]
        done = calibrate_done(done, self.cfg.done_scale, self.cfg.done_bias)
        return self.head(h), rowwise_linear(pooled, self.reward_head).squeeze(-1).float(), done

    # ---- full sequence (training, prefill, reference) ----------------------------------------
    def block_mask(self, t: int, device) -> torch.Tensor:
        # bool [T*N, T*N]: query frame i sees key frame j iff i - W < j <= i
        n, w = self.cfg.tokens_per_frame, self.cfg.window
        f = torch.arange(t, device=device).repeat_interleave(n)
        diff = f[:, None] - f[None, :]
        return (diff >= 0) & (diff < w)

    def forward(self, tokens, actions, known=None, frame_offset: int = 0, return_kv: bool = False,
                return_hidden: bool = False):
        # tokens: int64 [B, T, N]; actions: [B, T] (discrete) or [B, T, A] (continuous)
        # -> logits, reward, done (+ hidden [B, T, N, d]: the heads' input, if return_hidden) (+ kvs, if return_kv)
        b, t, n = tokens.shape
        x = self.embed(tokens, self.embed_actions(actions, known)).reshape(b, t * n, -1)  # [B, T*N, d]
        fidx = torch.arange(t, device=tokens.device).repeat_interleave(n) + frame_offset
        cos, sin = rope_tables(fidx, self.cfg.head_dim, self.cfg.rope_base)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        mask = self.block_mask(t, tokens.device)
        kvs = []
        for blk in self.blocks:
            q, k, v = blk.qkv_heads(x, cos, sin)
            if return_kv:  # [B, T, N, d] each
                kvs.append((k.transpose(1, 2).reshape(b, t, n, -1), v.transpose(1, 2).reshape(b, t, n, -1)))
            x = blk.finish(x, attention(q, k, v, mask))
        out = self.heads(x.view(b, t, n, -1))
        if return_hidden:
            out = (*out, x.view(b, t, n, -1))
        return (*out, kvs) if return_kv else out

    # ---- cached serving path -----------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, cache: KVCache, slots: torch.Tensor, tokens: torch.Tensor, actions, known=None):
        """Write C context frames into `slots` and keep the newest one as the next step's input.

        tokens: int64 [B, C, N] with 1 <= C <= W; actions: for the first C-1 frames ([B, C-1] or
        [B, C-1, A]), possibly all "unknown". Frames 0..C-2 enter the cache; frame C-1 waits in
        last_tokens for the first step, which brings its action.
        """
        b, c, _ = tokens.shape
        assert 1 <= c <= self.cfg.window, "context longer than the window"
        if c > 1:
            *_, kvs = self.forward(tokens[:, :-1], actions, known, return_kv=True)
            for layer, (k, v) in enumerate(kvs):
                cache.k[layer, slots, : c - 1] = k.to(cache.k.dtype)
                cache.v[layer, slots, : c - 1] = v.to(cache.v.dtype)
        cache.last_tokens[slots] = tokens[:, -1]
        cache.frames[slots] = c - 1

    def step_with(self, tokens: torch.Tensor, frames: torch.Tensor, actions, known, window_kv,
                  return_hidden: bool = False):
        """The cached step, written once for every backend: one new frame per row.

        tokens int64 [B, N] (the input frame), frames int64 [B] (its index; ring position frames % W),
        actions int64 [B] | float [B, A] (+ known bool [B]). window_kv(layer, k, v) receives this frame's
        keys / values float [B, N, d] (keys rotated) and returns the window to attend to, head-major
        [B, H, W*N, hd] with this frame at its ring position: `step` writes them into the KV cache and reads
        the window back; runtime/graphs.StepGraph (compile, ONNX, TensorRT) selects them without writing.
        -> logits [B, N, V], reward [B], done_logit [B] (+ hidden [B, N, d], the heads' input: the conditioning of
        a within-frame decoding head, model/maskgit.py, if return_hidden)
        """
        cfg = self.cfg
        b, n, w = tokens.shape[0], cfg.tokens_per_frame, cfg.window
        x = self.embed(tokens.unsqueeze(1), self.embed_actions(actions, known).unsqueeze(1)).view(b, n, -1)  # [B, N, d]
        cos, sin = rope_tables(frames, cfg.head_dim, cfg.rope_base)  # [B, hd/2]
        cos, sin = cos.unsqueeze(1).expand(b, n, -1), sin.unsqueeze(1).expand(b, n, -1)
        # valid ring entries: frames max(0, t-W+1) .. t  -> the first min(t+1, W) ring positions
        valid = torch.arange(w, device=frames.device)[None, :] < torch.clamp(frames + 1, max=w)[:, None]  # [B, W]
        mask = valid.repeat_interleave(n, dim=1)[:, None, None, :]  # [B, 1, 1, W*N]
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk.qkv_heads(x, cos, sin)  # [B, H, N, hd]
            kk, vv = window_kv(layer, k.transpose(1, 2).reshape(b, n, -1), v.transpose(1, 2).reshape(b, n, -1))
            x = blk.finish(x, attention(q, kk.to(q.dtype), vv.to(q.dtype), mask))
        logits, reward, done = self.heads(x.unsqueeze(1))
        out = logits[:, 0], reward[:, 0], done[:, 0]
        return (*out, x) if return_hidden else out

    @torch.no_grad()
    def step(self, cache: KVCache, slots: torch.Tensor, actions, known=None, return_hidden: bool = False):
        """One frame for every slot in `slots` [B]: returns logits [B, N, V], reward [B], done_logit [B].

        Writes the keys/values of the current frame (last_tokens + action) into the ring buffer.
        The caller samples the next tokens and calls `advance`.
        """
        t = cache.frames[slots]  # [B] frame index being written
        ring = t % self.cfg.window

        def window_kv(layer: int, k: torch.Tensor, v: torch.Tensor):
            cache.k[layer, slots, ring] = k.to(cache.k.dtype)
            cache.v[layer, slots, ring] = v.to(cache.v.dtype)
            # gather the slots' windows whole (one contiguous block per slot), then view them head-major
            # [B, H, W*N, hd] (strided: attention reads them in place)
            blk = self.blocks[layer]
            heads = (slots.shape[0], self.cfg.window * self.cfg.tokens_per_frame, blk.n_heads, blk.head_dim)
            return (cache.k[layer].index_select(0, slots).view(heads).transpose(1, 2),
                    cache.v[layer].index_select(0, slots).view(heads).transpose(1, 2))

        return self.step_with(cache.last_tokens[slots], t, actions, known, window_kv, return_hidden)


def advance(cache: KVCache, slots: torch.Tensor, next_tokens: torch.Tensor) -> None:
    # after a step: next_tokens int64 [B, N] become the input of the following step
    cache.last_tokens[slots] = next_tokens
    cache.frames[slots] += 1
