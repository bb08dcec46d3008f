"""The key gate on its own: key lookup, token bucket, in-flight / session counts, the priority cap."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import SecretStr

from worldserve.api.auth import PRINCIPAL, Gate, capped_priority
from worldserve.api.errors import RateLimited, Unauthenticated
from worldserve.messages import Priority
from worldserve.settings import AuthSettings, KeyLimits, Settings


def test_env_keys_are_comma_separated_and_secret(monkeypatch):
    monkeypatch.setenv("WORLDSERVE_AUTH__API_KEYS", "a1, b2 ,,")
    s = Settings()
    assert [k.get_secret_value() for k in s.auth.api_keys] == ["a1", "b2"]
    assert "a1" not in repr(s.auth)


def test_identify(tmp_path):
    f = tmp_path / "keys"
    f.write_text('k3 third\n{"key": "k4", "name": "fourth", "max_priority": "bulk"}\n')
    g = Gate(AuthSettings(api_keys=[SecretStr("k1")], api_keys_file=f), max_sessions=8)
    assert [w.name for _, w in g.keys] == ["key0", "third", "fourth"]
    assert g.identify("Bearer k1").name == "key0" and g.identify("bearer k3").name == "third"
    for bad in (None, "", "k1", "Bearer", "Bearer k", "Bearer k1x", "Basic k1"):
        with pytest.raises(Unauthenticated):
            g.identify(bad)
    assert Gate(AuthSettings(), 8).open and Gate(AuthSettings(), 8).identify(None) is None


def test_limits_and_priority_cap(tmp_path):
    line = {"key": "k", "rate": 2, "burst": 2, "max_concurrent": 3, "max_sessions": 1, "max_priority": "normal"}
    f = tmp_path / "keys"
    f.write_text(json.dumps(line))
    g = Gate(AuthSettings(api_keys_file=f), max_sessions=8)
    who = g.identify("Bearer k")
    g.enter(who, session=True)
    with pytest.raises(RateLimited, match="sessions"):
        g.enter(who, session=True)
    g.enter(who, session=False)
    with pytest.raises(RateLimited) as ei:  # bucket empty (2 taken; a refused call takes none): ~0.5 s
        g.enter(who, session=False)
    assert 0 < ei.value.retry_after <= 0.5
    time.sleep(0.55)
    g.enter(who, session=False)
    with pytest.raises(RateLimited, match="in flight"):
        g.enter(who, session=False)
    g.leave(who, session=True)
    g.leave(who, session=False)
    g.leave(who, session=False)
    assert who.in_flight == 0 and who.sessions == 0 and g.sessions == 0
    token = PRINCIPAL.set(who)
    try:
        assert capped_priority(Priority.INTERACTIVE) == Priority.NORMAL
        assert capped_priority(Priority.BULK) == Priority.BULK
    finally:
        PRINCIPAL.reset(token)
    assert capped_priority(Priority.INTERACTIVE) == Priority.INTERACTIVE  # open mode: as asked


def test_server_session_cap_applies_without_keys():
    g = Gate(AuthSettings(limits=KeyLimits(rate=1)), max_sessions=2)
    g.enter(None, session=True)
    g.enter(None, session=True)
    with pytest.raises(RateLimited, match="server"):
        g.enter(None, session=True)
    g.enter(None, session=False)  # not a session: no cap, no key limits in open mode


def test_required_keys_fail_closed(tmp_path):
    with pytest.raises(SystemExit, match="no API key"):
        Gate(AuthSettings(required=True), 8)
    with pytest.raises(SystemExit, match="does not exist"):
        Gate(AuthSettings(api_keys_file=tmp_path / "missing"), 8)
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n")
    with pytest.raises(SystemExit):
        Gate(AuthSettings(required=True, api_keys_file=empty), 8)
