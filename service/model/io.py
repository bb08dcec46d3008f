"""Model directory format: config.json + model.safetensors + MODEL_CARD.md.

Loading validates everything and names the file and the problem: a missing file, a truncated or
corrupt safetensors file, weights whose sha256 differs from the card, tensors missing, unexpected or
of the wrong shape for the config. The checks that need no code of the directory come first: the
architecture's trust decision (user code only with trust_remote_code, registry.py) and the weights' sha256
(against an operator's pin, else the card) are settled before the model is built.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from .config import ConfigurationError, ModelConfig
from .world_model import WorldModel

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "MODEL_CARD.md"
SHA_LINE = re.compile(r"^weights_sha256:\s*([0-9a-f]{64})\s*$", re.M)


class ModelLoadError(ConfigurationError):
    """A model directory that cannot be loaded; the message names the file and what is wrong."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_model_dir(model, out: Path, card_body: str, config: dict | None = None) -> str:
    """Write a model directory for any architecture: config.json (the model's own config, or `config`, which
    names its `architecture`), model.safetensors (its state_dict) and MODEL_CARD.md with the weights' sha256."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_dict() if config is None else config
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "name": str(config.get("name", out.name))})
    digest = sha256_file(out / WEIGHTS)
    (out / CARD).write_text(card_body.rstrip() + f"\n\nweights_sha256: {digest}\n")
    return digest


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a model directory needs {CONFIG}, {WEIGHTS}, {CARD})")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: invalid model config: {e}") from e


def card_sha256(model_dir: Path) -> str:
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing model card")
    m = SHA_LINE.search(path.read_text())
    if not m:
        raise ModelLoadError(f"{path}: no 'weights_sha256: <hex>' line")
    return m.group(1)


def read_config(model_dir: Path) -> dict:
    """config.json as a dict (nothing built, nothing imported)."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a model directory needs {CONFIG}, {WEIGHTS}, {CARD})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: invalid model config: a JSON object is needed, got {type(raw).__name__}")
    return raw


def architecture(raw: dict) -> str:
    return raw.get("architecture", "token")


def build_from_dir(model_dir: Path, trust_remote_code: bool = False):
    """An unweighted model of the directory's architecture (config.json `architecture`, default the token model).
    User code (`package.module:Class`, entry points) only with trust_remote_code: refused before any import."""
    path = Path(model_dir) / CONFIG
    raw = read_config(model_dir)
    arch = architecture(raw)
    if arch == "token":
        return WorldModel(load_config(model_dir))
    from .protocol import check_model
    from .registry import ArchitectureError, resolve

    try:
        model = resolve(arch, trust_remote_code).from_config(raw)
        check_model(model)
    except (ArchitectureError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from e
    return model


def load_model_dir(model_dir: str | Path, device: str = "cpu", verify: bool = True, trust_remote_code: bool = False,
                   weights_sha256: str | None = None) -> WorldModel:
    """Any architecture: the model named by config.json, its weights checked before anything is built.

    `weights_sha256` (what an operator pinned, e.g. the admin API's load request): the weights file is read once,
    its bytes hashed and compared with the pin, and those very bytes loaded (the card inside the directory is not
    consulted: whoever can write the directory can write its card). Without a pin and with `verify`, the weights'
    sha256 must match the card's `weights_sha256:` line (integrity, not authority). User code (an architecture
    `package.module:Class` or an entry point) loads only with `trust_remote_code`, refused before any import."""
    from .registry import ArchitectureError, check_trusted

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory")
    raw = read_config(model_dir)
    try:  # the trust decision first: nothing of the directory's code runs when it is refused
        check_trusted(architecture(raw), trust_remote_code)
    except ArchitectureError as e:
        raise ModelLoadError(f"{model_dir / CONFIG}: {e}") from e
    wpath = model_dir / WEIGHTS
    if not wpath.is_file():
        raise ModelLoadError(f"{wpath}: missing weights file")
    state = None
    if weights_sha256 is not None:
        data = wpath.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != weights_sha256.lower():
            raise ModelLoadError(f"{wpath}: sha256 {actual[:12]}… is not the pinned weights_sha256 "
                                 f"({weights_sha256[:12]}…): other, truncated or replaced weights")
        try:
            state = load_bytes(data)
        except (SafetensorError, ValueError) as e:
            raise ModelLoadError(f"{wpath}: unreadable safetensors file: {e}") from e
        del data
    elif verify:
        expected, actual = card_sha256(model_dir), sha256_file(wpath)
        if expected != actual:
            raise ModelLoadError(f"{wpath}: sha256 {actual[:12]}… does not match {CARD} ({expected[:12]}…): "
                                 "truncated, corrupt or replaced weights")
    model = build_from_dir(model_dir, trust_remote_code)
    if state is None:
        try:
            state = load_file(str(wpath))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{wpath}: unreadable safetensors file: {e}") from e
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    bad = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:3]}")
        if extra:
            parts.append(f"unexpected tensors {extra[:3]}")
        if bad:
            parts.append(", ".join(f"{k}: {tuple(state[k].shape)} vs config {tuple(want[k].shape)}" for k in bad[:3]))
        raise ModelLoadError(f"{wpath}: does not match {CONFIG}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model.to(device).eval()


def model_hash(model_dir: str | Path) -> str:
    return sha256_file(Path(model_dir) / WEIGHTS)[:16]
