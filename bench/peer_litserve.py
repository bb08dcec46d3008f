"""Peer baseline: worldserve's WorldModel behind LitServe, written as a LitServe user would write it.

NOT part of the service. bench/peer_bench.py starts this as a subprocess and measures it next to worldserve.

    python -m bench.peer_litserve --model-dir models/tiny --port 8100 [--max-batch-size 16 --batch-timeout 0.01]
    python -m bench.peer_litserve --preset base --port 8100

One endpoint, POST /predict (JSON; frames are base64 PNG, as a user of a JSON HTTP framework sends them):

    request   {"context": [png_b64, ...],            C frames, oldest first (1 <= C <= window)
               "context_actions": [a, ...] | null,   C-1 actions taken between the context frames
               "candidates": [[a_0 .. a_H-1], ...],  K action sequences (discrete int or continuous list)
               "frames": "all" | "last" | "none",  "temperature": 0.0,  "seed": 0}
    response  {"rewards": [[K x H]], "dones": [[K x H]],
               "frames": [[png_b64 per returned step] per candidate]}   (empty lists for "none")

What a user does with the model's public API: predict() gets a list of requests (LitServe's dynamic
batching), encodes every context, prefills each candidate's row (the context repeated K times: the
plain way to start K rollouts), then steps all rows of all requests together H times with argmax
(temperature 0) or softmax + torch.multinomial, and decodes the frames asked for. No sessions (LitServe
is request/response): a player sends its recent frames as the context of each one-step request.
"""

from __future__ import annotations

import argparse
import base64
import io

import litserve as ls
import numpy as np
import torch
from PIL import Image

from worldserve.model.dynamics import advance


def png_b64(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def from_png_b64(s: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"), dtype=np.uint8)


class WorldModelAPI(ls.LitAPI):
    def __init__(self, model_dir: str | None = None, preset: str | None = None, **kw):
        super().__init__(**kw)
        self.model_dir, self.preset = model_dir, preset

    def setup(self, device):
        from worldserve.model.config import PRESETS
        from worldserve.model.io import load_model_dir
        from worldserve.model.world_model import build

        torch.set_grad_enabled(False)
        model = build(PRESETS[self.preset], seed=0) if self.preset else load_model_dir(self.model_dir)
        self.model = model.to(device).eval()
        self.cfg = self.model.cfg
        self.dev = device

    def decode_request(self, request):
        ctx = np.stack([from_png_b64(s) for s in request["context"]])  # uint8 [C, H, W, 3]
        dtype = np.float32 if self.cfg.continuous else np.int64
        cands = np.asarray(request["candidates"], dtype=dtype)  # [K, H] or [K, H, A]
        ca = request.get("context_actions")
        return {"context": ctx, "candidates": cands,
                "context_actions": None if ca is None else np.asarray(ca, dtype=dtype),
                "frames": request.get("frames", "all"), "temperature": float(request.get("temperature", 0.0)),
                "seed": int(request.get("seed", 0))}

    def _context_actions(self, r, k: int):
        # actions between the C context frames, repeated for the K rows: [K, C-1] or [K, C-1, A] (+ known)
        c = r["context"].shape[0]
        acts, known = self.model.unknown_actions(k, c - 1, self.dev)
        if r["context_actions"] is not None and c > 1:
            acts[:] = torch.as_tensor(r["context_actions"][: c - 1], device=self.dev).to(acts.dtype)
            if known is not None:
                known[:] = True
        return acts, known

    def predict(self, batch):
        # batch: list of decoded requests (max_batch_size > 1) or one request
        reqs = batch if isinstance(batch, list) else [batch]
        rows = [r["candidates"].shape[0] for r in reqs]
        total, horizon = sum(rows), max(r["candidates"].shape[1] for r in reqs)
        cache = self.model.allocate_cache(total)
        starts = np.cumsum([0] + rows)
        for r, s, k in zip(reqs, starts, rows, strict=False):
            tokens = self.model.encode(torch.from_numpy(r["context"]).to(self.dev))  # [C, N]
            acts, known = self._context_actions(r, k)
            slots = torch.arange(s, s + k, device=self.dev)
            self.model.prefill(cache, slots, tokens.unsqueeze(0).expand(k, -1, -1), acts, known)
        all_slots = torch.arange(total, device=self.dev)
        temp = torch.tensor([r["temperature"] for r, k in zip(reqs, rows, strict=True) for _ in range(k)],
                            device=self.dev)
        gen = torch.Generator(device=self.dev).manual_seed(reqs[0]["seed"])
        rewards, dones, frames = [], [], []
        for t in range(horizon):
            a = np.concatenate([r["candidates"][:, min(t, r["candidates"].shape[1] - 1)] for r in reqs])
            logits, reward, done = self.model.step(cache, all_slots, torch.from_numpy(a).to(self.dev))
            nxt = logits.argmax(-1)  # [B, N]
            if (temp > 0).any():
                v = logits.shape[-1]
                probs = torch.softmax(logits / temp.clamp(min=1e-6)[:, None, None], -1)
                sampled = torch.multinomial(probs.view(-1, v), 1, generator=gen).view(nxt.shape)
                nxt = torch.where((temp > 0)[:, None], sampled, nxt)
            advance(cache, all_slots, nxt)
            rewards.append(reward.cpu().numpy())
            dones.append(done.cpu().numpy())
            want = any(r["frames"] == "all" or (r["frames"] == "last" and t == horizon - 1) for r in reqs)
            frames.append(self.model.decode(nxt).cpu().numpy() if want else None)
        out = []
        for r, s, k in zip(reqs, starts, rows, strict=False):
            h = r["candidates"].shape[1]
            steps = {"all": range(h), "last": [h - 1], "none": []}[r["frames"]]
            out.append({"rewards": np.stack(rewards[:h], 1)[s : s + k], "dones": np.stack(dones[:h], 1)[s : s + k],
                        "frames": [[frames[t][s + j] for t in steps] for j in range(k)]})
        return out if isinstance(batch, list) else out[0]

    def encode_response(self, output):
        return {"rewards": output["rewards"].tolist(), "dones": output["dones"].tolist(),
                "frames": [[png_b64(f) for f in cand] for cand in output["frames"]]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests per predict() (LitServe batching)")
    p.add_argument("--batch-timeout", type=float, default=0.01)
    a = p.parse_args(argv)
    api = WorldModelAPI(model_dir=a.model_dir, preset=a.preset, max_batch_size=a.max_batch_size,
                        batch_timeout=a.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=600)
    server.run(host="127.0.0.1", port=a.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
