"""The admin routes (`server.admin_api`): load a model directory, unload a model, without a restart (embedded
`serve` only: the LocalQueue). No torch here.

Admin is a role and loading a model is a trust decision:
- only keys with the `admin` scope (auth.py: `auth.admin_keys`, `"scopes": ["admin"]` in the keys file) reach these
  routes: the key gate refuses every other caller on /v1/admin/ with 403 before the body is read, and the router
  checks again (`admin_only`), so a route added here cannot forget it;
- a directory loads only from inside the admin model roots (`server.admin_model_roots`, else `model.repo`; the
  queue's `model_roots`), after resolving the path and its files (symlinks too); anything else is refused with one
  message whether or not the path exists;
- the name comes from config.json (read as JSON, nothing imported) and is checked before anything is hashed or built:
  a name served or being loaded -> 409 at once; a name served earlier in this process only comes back with the very
  same weights (queue/local.py: a new version takes a new name);
- the request pins the weights (`weights_sha256`): the server hashes model.safetensors itself and refuses other
  weights before building (the card in the directory is never trusted), and the loader checks the pin again on the
  bytes it loads;
- user code (`package.module:Class`, entry points) loads only with `model.trust_remote_code` (model/registry.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends

from ..errors import InvalidArgument, Unavailable
from ..queue.local import ModelConflict
from .auth import Principal, current_principal, require_admin
from .errors import Conflict, PermissionDenied
from .schemas import LoadModelIn

log = logging.getLogger("worldserve.api.admin")

CONFIG, WEIGHTS = "config.json", "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_NAME = 128
OUTSIDE = ("model directories load only from inside the server's admin model roots (server.admin_model_roots, "
           "else model.repo): refused")  # the same words whether or not the path exists


async def admin_only() -> Principal:  # async: runs in the request's context (the gate's key)
    """Dependency of every admin route: the caller's key must hold the `admin` scope (403 otherwise)."""
    return require_admin(current_principal())


Admin = Annotated[Principal, Depends(admin_only)]


def _inside(p: Path, roots) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


def confine(raw: str, roots) -> Path:
    """The resolved model directory if it and the files the loader reads lie inside `roots` (symlinks resolved);
    PermissionDenied with one message otherwise (nothing here says whether the path exists)."""
    if not roots:
        raise PermissionDenied("no admin model roots are configured (server.admin_model_roots, or serve a model "
                               "repository with model.repo): this server loads no model directory", "dir")
    try:
        p = Path(raw).resolve()
        files = [(p / f).resolve() for f in (CONFIG, WEIGHTS)]
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: the same refusal
        raise PermissionDenied(OUTSIDE, "dir") from None
    if not (_inside(p, roots) and all(_inside(f, roots) for f in files)):
        raise PermissionDenied(OUTSIDE, "dir")
    return p


def peek_name(model_dir: Path) -> str:
    """The model's name from config.json, read as JSON only (no class imported, no weights read)."""
    path = model_dir / CONFIG
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        raise InvalidArgument(f"{model_dir}: no readable {CONFIG} (a model directory needs {CONFIG}, {WEIGHTS}, "
                              "MODEL_CARD.md)", "dir") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{path}: over {MAX_CONFIG_BYTES} bytes", "dir")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{path}: invalid JSON: {e}", "dir") from None
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "/" in name:
        raise InvalidArgument(f"{path}: a model loaded through the admin API names itself: config.json needs a "
                              f"\"name\" (a string of 1-{MAX_NAME} characters without '/')", "dir")
    return name


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def admin_router(dp) -> APIRouter:
    """POST /v1/admin/models {"dir", "weights_sha256"} and DELETE /v1/admin/models/{name}, over dp.queue."""
    r = APIRouter(prefix="/v1/admin", dependencies=[Depends(admin_only)])

    @r.post("/models", status_code=201)
    async def load_model(body: LoadModelIn, who: Admin):
        q = dp.queue
        if getattr(q, "load_model", None) is None:
            raise Unavailable("loading models needs the embedded server (`worldserve serve`); in Redis mode start a "
                              "worker for the model")
        path = confine(body.dir, getattr(q, "model_roots", ()))
        name = await asyncio.to_thread(peek_name, path)
        pin = body.weights_sha256.lower()
        try:
            q.check_name(name, pin)  # before the weights are read or anything is built
        except ModelConflict as e:
            raise Conflict(str(e), "dir") from None
        try:
            actual = await asyncio.to_thread(sha256_of, path / WEIGHTS)
        except OSError:
            raise InvalidArgument(f"{path / WEIGHTS}: missing or unreadable weights file", "dir") from None
        if actual != pin:
            raise InvalidArgument(f"{path / WEIGHTS}: sha256 {actual} is not the pinned weights_sha256 {pin}: "
                                  "other weights than the ones you pinned; nothing was loaded", "weights_sha256")
        try:
            info = await q.load_model(path, name=name, weights_sha256=pin)
        except ModelConflict as e:
            raise Conflict(str(e), "dir") from None
        except (ValueError, TypeError, OSError, RuntimeError) as e:  # a bad directory, user code refused
            raise InvalidArgument(f"cannot load {str(path)!r}: {e}", "dir") from None
        log.warning("admin %s loaded model %r from %s (weights sha256 %s)", who.name, name, path, pin)
        return {**vars(info), "weights_sha256": pin}

    @r.delete("/models/{name}")
    async def unload_model(name: str, who: Admin):
        unload = getattr(dp.queue, "remove_model", None)
        if unload is None:
            raise Unavailable("unloading models needs the embedded server (`worldserve serve`)")
        await unload(name)
        log.warning("admin %s unloaded model %r", who.name, name)
        return {"unloaded": name}

    return r
