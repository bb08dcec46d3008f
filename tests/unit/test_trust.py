"""Model loading as a trust decision (issue 18): user code only with model.trust_remote_code, refused before any
import; an operator's pinned sha256 checked before anything is built; a served name keeps its weights."""

from __future__ import annotations

import asyncio
import shutil
import sys

import pytest

from tests.conftest import MODEL_DIR
from worldserve.model.io import ModelLoadError, load_model_dir, sha256_file
from worldserve.model.registry import UntrustedCode, resolve
from worldserve.queue.local import LocalQueue, ModelConflict

EXAMPLE = MODEL_DIR.parent.parent / "examples" / "custom_model"


def marker_module(tmp_path, name: str) -> tuple:
    """A module that leaves a marker file when imported (and would be a model class if trusted)."""
    mods = tmp_path / "mods"
    mods.mkdir(exist_ok=True)
    marker = tmp_path / f"{name}.imported"
    (mods / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                     "from scroll_world import ScrollWorld as Marked\n")
    return mods, marker


@pytest.fixture
def custom_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from scroll_world import ScrollWorld

    from worldserve.model.io import save_model_dir

    mods, marker = marker_module(tmp_path, "ws_marker_mod")
    monkeypatch.syspath_prepend(str(mods))
    config = {"architecture": "ws_marker_mod:Marked", "name": "scroll"}
    d = tmp_path / "scroll"
    save_model_dir(ScrollWorld.from_config(config), d, "# marked", config)
    yield d, marker
    sys.modules.pop("ws_marker_mod", None)


def test_user_code_is_refused_without_trust_and_never_imported(custom_dir):
    d, marker = custom_dir
    with pytest.raises(ModelLoadError, match="WORLDSERVE_MODEL__TRUST_REMOTE_CODE") as ei:
        load_model_dir(d)
    assert "privileges" in str(ei.value)  # the message says what the setting risks
    assert not marker.exists() and "ws_marker_mod" not in sys.modules
    with pytest.raises(UntrustedCode):
        resolve("some_entry_point")  # entry points are user code too: refused before any lookup
    assert resolve("denoiser").__name__ == "DenoisingWorldModel"  # built-ins need no trust
    m = load_model_dir(d, trust_remote_code=True)
    assert m.spec.name == "scroll" and marker.exists()


def test_pinned_sha256_is_checked_before_the_model_is_built(custom_dir):
    d, marker = custom_dir
    with pytest.raises(ModelLoadError, match="pinned weights_sha256"):
        load_model_dir(d, trust_remote_code=True, weights_sha256="0" * 64)
    assert not marker.exists()  # refused before the class was even imported
    card = d / "MODEL_CARD.md"  # the card is not the authority once a pin is given
    card.write_text(card.read_text().replace("weights_sha256:", "weights_sha256: 0 "))
    load_model_dir(d, trust_remote_code=True, weights_sha256=sha256_file(d / "model.safetensors"))


def test_a_name_keeps_its_weights_for_the_life_of_the_process(tmp_path):
    q = LocalQueue(loader=lambda d, sha: (_ for _ in ()).throw(AssertionError("built")))
    a, b = "a" * 64, "b" * 64

    class Info:
        name = "tiny"

    async def main():
        await q.add_model(object(), Info(), a)
        with pytest.raises(ModelConflict, match="already served"):  # before the loader runs
            await q.load_model(tmp_path, name="tiny", weights_sha256=a)
        q.served.pop("tiny")  # as remove_model does, without an engine thread
        with pytest.raises(ModelConflict, match="other weights|new name"):
            await q.load_model(tmp_path, name="tiny", weights_sha256=b)
        q.check_name("tiny", a.upper())  # the same weights may come back
        q.check_name("other", b)

    asyncio.run(main())


def test_the_shipped_models_load_without_trust(tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(MODEL_DIR, copy)
    assert load_model_dir(copy, weights_sha256=sha256_file(copy / "model.safetensors")).cfg.name == "tiny"
    assert load_model_dir(MODEL_DIR.parent / "denoiser").spec.name == "denoiser"  # a built-in architecture
