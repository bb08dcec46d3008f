"""The one settings object (pydantic-settings): flags and WORLDSERVE_* env vars, sub-configs passed down.

Env vars nest with a double underscore, e.g. WORLDSERVE_ENGINE__MAX_SLOTS=128,
WORLDSERVE_QUEUE__URL=redis://:password@host:6379/0. Nothing else in the code reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .wire import BackendName, PrecisionName, PriorityName

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny"


class ModelSettings(BaseModel):
    dir: Path = DEFAULT_MODEL_DIR
    repo: Path | None = Field(None, description="a model repository: serve every directory in it that holds a "
                              "config.json, side by side (each with its own engine, slots and queue); overrides dir")
    preset: str | None = Field(None, description="serve a random-weight preset (tiny/base/large) instead of dir")
    device: str = "cpu"
    backend: BackendName = "eager"
    precision: PrecisionName | None = Field(None, description="unset: the device's default, bf16 on CUDA (TF32 for "
                                            "any fp32 work), fp32 on the CPU (default_precision)")
    auto: bool = Field(True, description="serve the model directory's serving.json pin (the fastest backend x "
                       "precision that passed the quality gate on a machine like this, written by `worldserve tune`) "
                       "when it still holds here (weights, machine features, a quick gate on a few frames), else the "
                       "device default (eager, default_precision). Off as soon as backend or precision is named "
                       "(flag or env): an explicit choice always wins")
    artifact_dir: Path = Path("artifacts")
    triton_kernels: bool = False
    warmup: bool = True
    trust_remote_code: bool = Field(False, description="load a model whose config.json names user code (an "
                                    "architecture `package.module:Class` or a `worldserve.models` entry point): that "
                                    "code runs in the server with its privileges. Off: only the built-in "
                                    "architectures load; turn it on only for model directories you trust")

    @model_validator(mode="after")
    def _device_default(self):
        # an unset precision becomes the device's default, still unset (model_fields_set), so that a later
        # --device override (cli/serve.py re-validates the fields that were set) picks the new device's default
        if self.precision is None:
            self.__dict__["precision"] = default_precision(self.device)
        if "auto" not in self.model_fields_set and {"backend", "precision"} & self.model_fields_set:
            self.__dict__["auto"] = False  # named: no pin (a dump carries `auto`, so a round trip keeps it)
        return self


def default_precision(device: str) -> PrecisionName:
    """bf16 on CUDA: tensor-core matmuls, half the KV cache traffic, within the quality gate (docs/benchmarks-
    runtime.md). fp32 on the CPU: bf16 pays there only with AVX-512 BF16 / AMX, and the bundled models' tests
    compare against fp32 references; choose --precision bf16 on such a CPU."""
    return "bf16" if device.split(":")[0] == "cuda" else "fp32"


class EngineSettings(BaseModel):
    """The engine's configuration (engine.Engine takes it as is)."""

    max_slots: int = Field(64, ge=1, le=4096)
    max_queue: int = Field(256, ge=1, description="waiting requests; beyond this, submit raises QueueFull")
    max_candidates: int = Field(64, ge=1)
    session_idle_s: float = 300.0
    max_consecutive_failures: int = Field(3, ge=1, description="failing steps in a row before the engine gives "
                                          "up (fatal)")
    share_prefixes: bool = Field(True, description="candidates of one request with equal action prefixes step as "
                                 "one row, forked where they diverge (engine/prefix.py; exact: greedy rollouts and "
                                 "common_random_numbers); off: every candidate its own row")
    context_cache_slots: int = Field(8, ge=0, le=4096, description="state slots that keep prefilled contexts "
                                     "across requests (engine/context_cache.py: a request whose context frames and "
                                     "actions were prefilled before, by the same key, copies them instead of encoding "
                                     "and prefilling again; exact), least recently used evicted; allocated at "
                                     "start-up beside max_slots; 0: off")
    exact_batches: bool = Field(True, description="an eager model on the CPU steps its rows unpadded (nothing there "
                                "is compiled per shape); off: power-of-two buckets, as compiled backends and CUDA "
                                "always use (runtime/batch.exact_batches)")
    tune_malloc: bool = Field(True, description="a process that hosts an engine pins glibc's mmap threshold at "
                              "32 MiB and raises its trim threshold, so the step's large temporaries are reused "
                              "from the heap instead of faulting fresh pages in every step (runtime/host_malloc.py: "
                              "the engine 1.23x at bf16, 1.08x at fp32, 64 rows); freed memory stays with the process")
    isolated: bool = Field(True, description="`serve`: run each model's engine in its own process "
                           "(engine/process.py), so a model that crashes its process takes down only itself; the "
                           "front end ends its requests at once and starts it again")


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    admin_api: bool = Field(False, description="POST /v1/admin/models (load a model directory) and DELETE "
                            "/v1/admin/models/{name} (unload) in `serve`, for keys with the `admin` scope only; "
                            "refuses to start without an admin key")
    admin_model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories the admin API may load model directories from (a "
        "directory must lie inside one); empty = the model repository (model.repo) only. Comma-separated in env")
    http_port: int = 8000
    grpc_port: int = 50051
    max_body_bytes: int = 16 * 1024 * 1024  # REST body, WS message and gRPC message limit
    max_request_items: int = Field(65536, ge=16, description="most JSON arrays/objects in a REST body, "
                                   "repeated messages in a gRPC request: bounds parse memory")
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_decode_ms: float = Field(250.0, gt=0, description="decode-time budget of one context frame in CPU "
                                       "time of the decoding thread (off the event loop); a compressed frame "
                                       "that needs longer is refused")
    max_json_depth: int = Field(32, ge=4, description="deepest nesting of arrays/objects in a REST body or WS message")
    max_request_cost: int = Field(65536, ge=1, description="most candidate-steps (candidates x horizon, x2 when "
                                  "frames come back every step) one request may ask for; a key may have less")
    grace_s: float = 10.0
    log_level: str = "info"
    # TLS: PEM files; both set = HTTPS/WSS and gRPC over TLS. tls_client_ca also set = gRPC requires client
    # certificates signed by that CA (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # connection hygiene
    http_max_connections: int = Field(1024, ge=1, description="open HTTP connections + tasks; over it: 503")
    http_keep_alive_s: float = 5.0
    http_header_timeout_s: float = Field(10.0, gt=0, description="a connection must send its headers within this")
    http_body_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next piece of a request body")
    http_max_header_bytes: int = Field(16384, ge=1024, description="request line + headers of one request; over it: "
                                       "431 and the connection closed")
    http_max_headers: int = Field(100, ge=8, description="header lines of one request; over it: 431")
    max_unauthenticated_connections: int = Field(256, ge=1, description="open HTTP connections that have not yet "
                                                 "made an authenticated request (keys configured); over it: closed")
    grpc_max_streams_per_connection: int = Field(32, ge=1, description="concurrent HTTP/2 streams (RPCs) on one "
                                                 "gRPC connection (below max_slots: one connection that never reads "
                                                 "cannot hold every slot until the slow-consumer cut)")
    session_open_timeout_s: float = Field(10.0, gt=0, description="a WebSocket / gRPC Session must send its `open` "
                                          "within this, or it is closed")
    grpc_max_concurrent_rpcs: int = Field(1024, ge=0, description="0 = unlimited; over it: RESOURCE_EXHAUSTED")
    grpc_keepalive_time_s: float = 60.0  # server pings idle connections this often
    grpc_keepalive_timeout_s: float = 20.0  # ... and drops them when a ping goes unanswered this long
    grpc_max_connection_idle_s: float = 600.0
    grpc_min_ping_interval_s: float = 10.0  # clients pinging more often are refused (GOAWAY)
    max_sessions: int = Field(256, ge=1, description="open sessions (WS + gRPC) in this front end")
    request_timeout_s: float = Field(600.0, gt=0, description="the deadline of a rollout or predict that names none "
                                     "(every mode): a wedged engine or a long queue never holds a client for ever")
    max_pending_actions: int = Field(32, ge=1, description="actions of one session sent but not yet answered with a "
                                     "frame: past it the front end stops reading the client (backpressure), so the "
                                     "engine, the early-action buffer and the Redis session stream stay bounded")
    slow_consumer_s: float = Field(30.0, gt=0, description="a client that takes no event for this long while "
                                   "the server waits to write to it is cut off (request cancelled, slots freed)")

    @field_validator("admin_model_roots", mode="before")
    @classmethod
    def _split_roots(cls, v):
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


class KeyLimits(BaseModel):
    """Per-key limits; 0 = unlimited."""

    rate: float = Field(0.0, ge=0, description="requests per second (token bucket), sessions' actions excluded")
    burst: float = Field(0.0, ge=0, description="bucket size (default: max(1, rate))")
    max_concurrent: int = Field(0, ge=0, description="requests in flight (rollouts, predicts, sessions)")
    max_slots: int = Field(0, ge=0, description="engine slots held at once: candidates of requests in flight, "
                           "1 per session")
    max_sessions: int = Field(0, ge=0, description="open sessions")
    max_priority: PriorityName = "interactive"
    max_request_cost: int = Field(0, ge=0, description="most candidate-steps per request for this key (0: the "
                                  "server's server.max_request_cost)")
    max_cost_in_flight: int = Field(0, ge=0, description="candidate-steps of this key's requests in flight at once")
    weight: float = Field(1.0, gt=0, description="share of the engine's slots when keys compete (fair sharing)")


class AuthSettings(BaseModel):
    """API keys. None configured = open mode (bind to 127.0.0.1). Env: WORLDSERVE_AUTH__API_KEYS=k1,k2."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # comma-separated in env
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="keys with the "
                                                             "`admin` scope (comma-separated in env)")
    api_keys_file: Path | None = Field(None, description="one key per line; `key name` or JSON lines "
                                       '{"key": ..., "name": ..., "rate": ..., "max_concurrent": ...}')
    required: bool = False  # refuse to start without keys (deployments: fail closed, never open by accident)
    public_metrics: bool = False  # /metrics without a key
    public_docs: bool = False  # /docs, /redoc, /openapi.json, /play, /static without a key
    limits: KeyLimits = KeyLimits()  # default limits of every key (a keys-file line may override them)

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v


class QueueSettings(BaseModel):
    url: str = "local"  # "local" (in-process) or redis://[user:pass@]host:port/db, rediss:// for TLS
    password: SecretStr | None = None
    username: str | None = None
    tls_ca: Path | None = None
    stream_maxlen: int = 1024  # request stream bound: over it, 429 at the front end
    session_maxlen: int = Field(10_000, ge=16, description="actions kept per session stream (MAXLEN); a session "
                                "moved to another worker after more actions ends with UNAVAILABLE (it is replayed "
                                "from its stream to rebuild it exactly)")
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
    auth: AuthSettings = AuthSettings()
