"""Prometheus metrics, defined once; engine, queue and front ends update them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# engine metrics carry the served model's name (a model repository serves several side by side)
QUEUE_DEPTH = Gauge("worldserve_queue_depth", "Requests waiting for slots", ["model"])
ACTIVE_SLOTS = Gauge("worldserve_active_slots", "Cache slots in use", ["model"])
BATCH_SIZE = Histogram("worldserve_batch_size", "Slots per dynamics step", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STEP_SECONDS = Histogram("worldserve_step_seconds", "Engine step latency", ["model"],
                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
FRAMES = Counter("worldserve_frames_total", "Predicted frames (steps of every candidate)", ["model"])
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
