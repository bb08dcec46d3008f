"""The key gate on its own: key lookup, token bucket, in-flight / session counts, the priority cap."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import SecretStr

from worldserve.api.auth import Gate, capped_priority, require_admin, require_admin_key
from worldserve.api.errors import PermissionDenied, RateLimited, Unauthenticated
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
    assert capped_priority(Priority.INTERACTIVE, who) == Priority.NORMAL  # the caller's key, passed explicitly
    assert capped_priority(Priority.BULK, who) == Priority.BULK
    assert capped_priority(Priority.INTERACTIVE, None) == Priority.INTERACTIVE  # open mode: as asked


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


def test_scopes_admin_keys_and_plain_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text('plain-file\n{"key": "ops", "name": "ops", "scopes": ["admin"]}\n{"key": "user", "scopes": []}\n')
    g = Gate(AuthSettings(api_keys=[SecretStr("k1")], admin_keys=[SecretStr("root")], api_keys_file=f), 8)
    assert {w.name: w.admin for _, w in g.keys} == {"key0": False, "admin0": True, "file0": False, "ops": True,
                                                    "file2": False}
    assert require_admin(g.identify("Bearer root")).name == "admin0"
    assert require_admin(g.identify("Bearer ops")).name == "ops"
    for plain in ("k1", "plain-file", "user"):
        with pytest.raises(PermissionDenied, match="admin"):
            require_admin(g.identify(f"Bearer {plain}"))
    with pytest.raises(PermissionDenied):
        require_admin(None)  # open mode: nobody is an admin
    require_admin_key(g.keys)
    with pytest.raises(SystemExit, match="WORLDSERVE_SERVER__ADMIN_API.*WORLDSERVE_AUTH__ADMIN_KEYS"):
        require_admin_key(Gate(AuthSettings(api_keys=[SecretStr("k1")]), 8).keys)
    with pytest.raises(SystemExit, match="ADMIN_KEYS"):
        require_admin_key(Gate(AuthSettings(), 8).keys)


def test_bad_scopes_and_duplicate_keys_refuse_to_start(tmp_path):
    f = tmp_path / "keys"
    f.write_text('{"key": "x", "scopes": ["root"]}\n')
    with pytest.raises(SystemExit, match="unknown scope"):
        Gate(AuthSettings(api_keys_file=f), 8)
    f.write_text('{"key": "x", "scopes": "admin"}\n')
    with pytest.raises(SystemExit, match="list of strings"):
        Gate(AuthSettings(api_keys_file=f), 8)
    with pytest.raises(SystemExit, match="twice"):  # plain in one place, admin in another: which one is it?
        Gate(AuthSettings(api_keys=[SecretStr("same")], admin_keys=[SecretStr("same")]), 8)
