"""Model directory validation: every broken file gives an error naming the file and the problem."""

import json
import shutil

import pytest

from tests.conftest import MODEL_DIR
from worldserve.model.io import ModelLoadError, load_model_dir


@pytest.fixture
def copy(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODEL_DIR, d)
    return d


def test_loads(copy):
    assert load_model_dir(copy).cfg.name == "tiny"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "MODEL_CARD.md"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_model_dir(copy)


def test_truncated_weights(copy):
    w = copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*sha256"):
        load_model_dir(copy)
    with pytest.raises(ModelLoadError, match="model.safetensors.*unreadable"):
        load_model_dir(copy, verify=False)


def test_config_mismatch(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["d_model"] = 256
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match config.json"):
        load_model_dir(copy)


def test_bad_config(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: invalid"):
        load_model_dir(copy)
    (copy / "config.json").write_text(json.dumps({"d_model": 128, "bogus": 1}))
    with pytest.raises(ModelLoadError, match="bogus"):
        load_model_dir(copy)
