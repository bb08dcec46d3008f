"""Prometheus metrics, defined once; engine, queue and front ends update them; /metrics shows them (exposition)."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

# engine metrics carry the served model's name (a model repository serves several side by side)
QUEUE_DEPTH = Gauge("worldserve_queue_depth", "Requests waiting for slots", ["model"])
ACTIVE_SLOTS = Gauge("worldserve_active_slots", "Cache slots in use", ["model"])
BATCH_SIZE = Histogram("worldserve_batch_size", "Slots per dynamics step", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STEP_SECONDS = Histogram("worldserve_step_seconds", "Engine step latency", ["model"],
                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
FRAMES = Counter("worldserve_frames_total", "Predicted frames (steps of every candidate)", ["model"])
CONTEXT_CACHE = Counter("worldserve_context_cache_total", "Admissions of a request's candidates (a request may be "
                        "admitted in chunks) whose context was copied from a prefill already made (hit: from the "
                        "context cache or from another request of the same admission) or was encoded and "
                        "prefilled (miss)", ["model", "result"])
REQUESTS = Counter("worldserve_requests_total", "Requests by model and outcome", ["model", "outcome"])
TTFF = Histogram("worldserve_time_to_first_frame_seconds", "Submit to first event", ["model"],
                 buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
REDIS_STREAM_LEN = Gauge("worldserve_redis_stream_length", "Entries in the request stream", ["model"])
REDIS_PENDING = Gauge("worldserve_redis_pending", "Delivered but unacknowledged requests (a steady rise is a leak)",
                      ["model"])
SESSIONS = Gauge("worldserve_sessions", "Open sessions held by this process's engines", ["model"])
REDIS_RECLAIMED = Counter("worldserve_redis_reclaimed_total", "Requests reclaimed from dead workers")
REDIS_DEAD_LETTERED = Counter("worldserve_redis_dead_lettered_total", "Requests moved to the dead-letter stream")
REDIS_HOP = Histogram("worldserve_redis_hop_seconds", "Worker event to front end, through Redis",
                      buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))


# ---- engines in their own processes (engine/process.py) -------------------------------------------------------------
# Each engine process sends its registry's text every metrics interval (ipc.METRICS); /metrics merges the worldserve_
# families of every live engine process into this process's, so an isolated `serve` shows what an in-process one does.
_REMOTE: dict[str, str] = {}
_REMOTE_LOCK = threading.Lock()


def set_remote(source: str, text: str | None) -> None:
    """The latest exposition text of an engine process (None: it died; its figures go with it)."""
    with _REMOTE_LOCK:
        if text is None:
            _REMOTE.pop(source, None)
        else:
            _REMOTE[source] = text


class _Merged:
    """A collector over this process's registry and the engine processes' latest texts: samples of one series (same
    name and labels) are added (a counter the front end and an engine both keep), families concatenated."""

    def __init__(self, registry, texts: list[str]):
        self.registry, self.texts = registry, texts

    def collect(self):
        fams: dict[str, object] = {}
        for fam in self.registry.collect():
            fams[fam.name] = fam
        for text in self.texts:
            for fam in text_string_to_metric_families(text):
                if not fam.name.startswith("worldserve_") or fam.name.endswith("_created"):
                    continue  # process_* / python_* describe the engine's process; _created: when it started
                fam.samples = [s for s in fam.samples if not s.name.endswith("_created")]
                have = fams.get(fam.name)
                if have is None:
                    fams[fam.name] = fam
                    continue
                index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(have.samples)}
                for s in fam.samples:
                    i = index.get((s.name, tuple(sorted(s.labels.items()))))
                    if i is None:
                        have.samples.append(s)
                    else:
                        have.samples[i] = have.samples[i]._replace(value=have.samples[i].value + s.value)
        return list(fams.values())


def exposition() -> bytes:
    """/metrics: this process's registry plus every engine process's worldserve_ figures."""
    with _REMOTE_LOCK:
        texts = list(_REMOTE.values())
    if not texts:
        return generate_latest(REGISTRY)
    return generate_latest(_Merged(REGISTRY, texts))
