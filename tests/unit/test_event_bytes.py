"""The REST / WebSocket event encoding: event_bytes (the frame's base64 spliced in) is the JSON of event_json."""

import json

import numpy as np
import pytest

from worldserve.api.anytime import Reach
from worldserve.api.schemas import event_bytes, event_json
from worldserve.messages import ErrorCode, RolloutEvent

FRAME = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("ev", [
    RolloutEvent("r", 3, 7, -1.0, 0.25, frame=FRAME, confidence=0.5, ended=True),
    RolloutEvent("r", 0, 0, 0.0, 0.0, frame=FRAME, tokens=np.arange(64, dtype=np.int64)),
    RolloutEvent("r", 1, 2, 0.5, 1e-9),  # frames "none"
    RolloutEvent.end("r"),
    RolloutEvent.end("r", ErrorCode.INVALID_ARGUMENT, 'a "quoted"\x00 message'),
])
@pytest.mark.parametrize("enc", ["raw", "png"])
def test_event_bytes_is_the_json_of_event_json(ev, enc):
    assert json.loads(event_bytes(ev, enc)) == event_json(ev, enc)
    head = {"type": "frame", "t": 1.5}
    got = json.loads(event_bytes(ev, enc, head=head))
    assert got == {**head, **event_json(ev, enc)} and list(got)[:2] == ["type", "t"]


def test_event_bytes_carries_an_anytime_end():
    reach = Reach(4, [4, 2])
    reach.truncated = [False, True]
    ev = RolloutEvent.end("r", ErrorCode.OK, "anytime: cut")
    assert json.loads(event_bytes(ev, "raw", reach)) == event_json(ev, "raw", reach)


def test_the_rest_client_reads_ndjson_lines_across_chunks():
    import httpx

    from worldserve.client.client import _ndjson

    body = b'{"a":1}\n\n{"b":"' + b"x" * 5000 + b'"}\r\n{"c":3}'  # a blank line, CRLF, no final newline
    for size in (1, 7, 64, 10_000):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        lines = [json.loads(ln) for ln in _ndjson(httpx.Response(200, content=iter(chunks)))]
        assert lines == [{"a": 1}, {"b": "x" * 5000}, {"c": 3}], size
