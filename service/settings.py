"""The one settings object (pydantic-settings): flags and WORLDSERVE_* env vars, sub-configs passed down.

Env vars nest with a double underscore, e.g. WORLDSERVE_ENGINE__MAX_SLOTS=128,
WORLDSERVE_QUEUE__URL=redis://:password@host:6379/0. Nothing else in the code reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny"


class ModelSettings(BaseModel):
    dir: Path = DEFAULT_MODEL_DIR
    preset: str | None = Field(None, description="serve a random-weight preset (tiny/base/large) instead of dir")
    device: str = "cpu"
    backend: Literal["eager", "compile", "onnxruntime", "tensorrt"] = "eager"
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = "fp32"
    artifact_dir: Path = Path("artifacts")
    triton_kernels: bool = False
    warmup: bool = True


class EngineSettings(BaseModel):
    max_slots: int = Field(64, ge=1, le=4096)
    max_queue: int = Field(256, ge=1)
    max_candidates: int = Field(64, ge=1)
    session_idle_s: float = 300.0


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 4 * 1024 * 1024
    grace_s: float = 10.0
    log_level: str = "info"


class QueueSettings(BaseModel):
    url: str = "local"  # "local" (in-process) or redis://[user:pass@]host:port/db, rediss:// for TLS
    password: SecretStr | None = None
    username: str | None = None
    tls_ca: Path | None = None
    stream_maxlen: int = 1024  # request stream bound: over it, 429 at the front end
    result_ttl_s: int = 300
    claim_idle_ms: int = 15000  # above the longest legal step
    max_deliveries: int = 3
    block_ms: int = 1000
    heartbeat_s: float = 2.0
    worker_name: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORLDSERVE_", env_nested_delimiter="__", extra="ignore")

    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    server: ServerSettings = ServerSettings()
    queue: QueueSettings = QueueSettings()
