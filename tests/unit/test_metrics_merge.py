"""/metrics of a front end whose engines run in their own processes: the engine processes' worldserve_ families are
merged into the front end's (same series added, other series appended), the result parses with one family per name,
and a dead process's figures go away."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worldserve import metrics


def engine_text(model: str, frames: float) -> str:
    reg = CollectorRegistry()  # an engine process's registry
    Counter("worldserve_frames_total", "Predicted frames", ["model"], registry=reg).labels(model).inc(frames)
    Histogram("worldserve_batch_size", "Slots", ["model"], buckets=(1, 8, 64), registry=reg).labels(model).observe(5)
    return generate_latest(reg).decode()


def series(text: str) -> dict[tuple, float]:
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), f"a family twice: {sorted(names)}"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples}


def test_engine_processes_metrics_are_merged_and_dropped_with_the_process():
    metrics.FRAMES.labels("m-front").inc(2)  # a series only the front end has
    metrics.FRAMES.labels("m-both").inc(1)  # and one both have: added
    try:
        metrics.set_remote("a", engine_text("m-a", 7))
        metrics.set_remote("b", engine_text("m-both", 4))
        s = series(metrics.exposition().decode())
        assert s[("worldserve_frames_total", (("model", "m-a"),))] == 7
        assert s[("worldserve_frames_total", (("model", "m-both"),))] == 5
        assert s[("worldserve_frames_total", (("model", "m-front"),))] == 2
        assert s[("worldserve_batch_size_count", (("model", "m-a"),))] == 1
        metrics.set_remote("a", None)  # the process died
        s = series(metrics.exposition().decode())
        assert ("worldserve_frames_total", (("model", "m-a"),)) not in s
        assert s[("worldserve_frames_total", (("model", "m-both"),))] == 5
    finally:
        metrics.set_remote("a", None)
        metrics.set_remote("b", None)
