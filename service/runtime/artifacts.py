"""On-disk cache of built backend artifacts (ONNX graphs, TensorRT engines).

An artifact directory is keyed by everything that changes what was built: the weights' hash, backend,
precision, device, model config, the library versions and this code's export format version. Its
manifest.json records that key and the sha256 of every file. A directory is trusted only if the manifest
parses, its key is the one asked for and every file hashes to what the manifest says; anything else
(stale, truncated, corrupt, half-written) is deleted and rebuilt. Builds go to a temporary sibling that is
renamed into place once complete, so a crash mid-build never leaves a directory that looks valid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.io import sha256_file

log = logging.getLogger("worldserve.runtime")
MANIFEST = "manifest.json"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes): quantized weights included."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def library_versions(*packages: str) -> dict[str, str]:
    out = {"torch": torch.__version__}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def check(path: Path, key: dict) -> str | None:
    """None if the directory at `path` is a complete, uncorrupted build of `key`; else why not."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        return "no manifest"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if manifest["key"] != key:
            return "built for another key (stale)"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its sha256 (corrupt or modified)"
    return None


def load_or_build(root: Path, label: str, key: dict, build: Callable[[Path], None],
                  say: Callable[[str], None] = log.info) -> Path:
    """The artifact directory for `key` under `root`, built by `build(tmp_dir)` unless a valid one exists.

    label: readable prefix of the directory name (e.g. "tiny-onnxruntime-fp32-cpu").
    """
    root = Path(root)
    path = root / f"{label}-{key_digest(key)[:16]}"
    if path.exists():
        why = check(path, key)
        if why is None:
            say(f"using cached artifacts {path}")
            return path
        say(f"rebuilding {path}: {why}")
        shutil.rmtree(path, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same build first: use theirs if it is valid
            if check(path, key) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"built artifacts {path}")
    return path
