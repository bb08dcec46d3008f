"""Import boundaries (the folder map of docs/architecture.md, checked on the source: function-level imports
count) and message encoding."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.imports import cycles, folder, graph
from worldserve.messages import ErrorCode, FrameMode, RolloutEvent, RolloutRequest, SessionAction, pack, unpack

SERVICE = Path(__file__).resolve().parents[2] / "service"
SERVING = {"(root)", "api", "queue", "worker", "engine", "runtime", "model", "kernels"}


@pytest.fixture(scope="module")
def g():
    return graph()


def _edges(g, src_folders):
    return {(a, b) for a, ts in g.items() if folder(a) in src_folders for b in ts}


def test_api_package_never_imports_torch():
    code = ("import sys, worldserve.api.http, worldserve.api.grpc_server, worldserve.api.ws, worldserve.queue.local, "
            "worldserve.queue.redis_queue, worldserve.client.client, worldserve.client.gym, worldserve.engine.host; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_import_cycles(g):
    assert cycles(g) == []


def test_front_end_queue_and_client_never_import_the_model_runtime_or_kernels(g):
    bad = {(a, b) for a, b in _edges(g, {"api", "queue", "client"})
           if folder(b) in {"model", "runtime", "kernels", "lab"} - ({"lab"} if folder(a) == "client" else set())}
    bad |= {(a, b) for a, b in _edges(g, {"queue"}) if b.startswith("worldserve.engine.")
            and b != "worldserve.engine.host"}  # the local queue hosts an engine through the torch-free host only
    assert not bad, bad


def test_model_imports_nothing_above_it(g):
    assert not {(a, b) for a, b in _edges(g, {"model"}) if folder(b) not in {"model", "kernels"}}


def test_the_engine_knows_no_transport(g):
    assert not {(a, b) for a, b in _edges(g, {"engine"}) if folder(b) in {"api", "queue", "worker", "cli", "client"}}


def test_nothing_that_serves_imports_the_lab_or_the_cli(g):
    assert not {(a, b) for a, b in _edges(g, SERVING) if folder(b) in {"lab", "cli", "client"}}


def test_the_package_root_holds_only_the_shared_vocabulary():
    root = sorted(p.stem for p in SERVICE.glob("*.py") if p.stem != "__init__")
    assert len(root) <= 5, root


def test_messages_roundtrip():
    req = RolloutRequest("abc", "tiny", np.arange(2 * 64 * 64 * 3, dtype=np.uint8).reshape(2, 64, 64, 3) % 251,
                         np.array([[0, 1, 2]]), np.array([1]), FrameMode.NONE, True, 2**62, 0.5, 123.5, session=True)
    back = unpack(pack(req))
    assert back.id == "abc" and back.frames == FrameMode.NONE and back.seed == 2**62 and back.session
    np.testing.assert_array_equal(back.context, req.context)
    np.testing.assert_array_equal(back.actions, req.actions)
    ev = RolloutEvent("abc", 3, 4, 0.25, 0.5, frame=req.context[0], tokens=np.arange(64))
    e2 = unpack(pack(ev))
    assert (e2.candidate, e2.step, e2.reward) == (3, 4, 0.25)
    np.testing.assert_array_equal(e2.frame, ev.frame)
    end = unpack(pack(RolloutEvent.end("abc", ErrorCode.DEADLINE_EXCEEDED, "late")))
    assert end.final and end.error == ErrorCode.DEADLINE_EXCEEDED and end.frame is None
    sa = unpack(pack(SessionAction("abc", np.asarray(2))))
    assert int(sa.action) == 2


def test_the_client_and_its_gym_env_install_without_the_serving_extra():
    # `pip install 'worldserve[client]'` brings the base dependencies and the client extra, never torch: the
    # client, the gymnasium env and what they import must run with every package of the `serve` extra missing
    import tomllib

    with open(SERVICE.parent / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    serve = [r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in
             project["optional-dependencies"]["serve"]]
    assert "torch" in serve and not any(r.startswith("torch") for r in project["dependencies"])
    modules = {"pydantic-settings": "pydantic_settings", "grpcio-health-checking": "grpc_health",
               "grpcio-reflection": "grpc_reflection", "prometheus-client": "prometheus_client"}
    blocked = sorted({modules.get(d, d.replace("-", "_")) for d in serve} | {"starlette"})
    code = (
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} belongs to the serve extra')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import worldserve.client.client, worldserve.client.gym\n"
        "frames, _ = worldserve.client.gym.minigrid_context('dynamic')(0)\n"
        "assert frames.shape == (1, 64, 64, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
