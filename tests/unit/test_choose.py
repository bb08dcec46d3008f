"""The default-configuration choice (issue 20 item 2): a model directory's serving.json pin is served when it still
holds on this machine (weights, features, support, a quick gate vs fp32), else the device default with the reason;
an explicit --backend / --precision always wins. Real shipped models, real quick gates (each well under a second)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
import torch

from tests.conftest import ROOT
from worldserve.cli.serve import _settings
from worldserve.model.io import WEIGHTS, sha256_file
from worldserve.runtime.choose import PIN_FILE, machine_features, missing, needs, read_pin, write_pin
from worldserve.runtime.loader import choose_config as choose
from worldserve.runtime.loader import prepare
from worldserve.settings import ModelSettings, Settings


def model_dir(tmp_path, name: str):
    d = tmp_path / name
    d.mkdir()
    for f in ("config.json", "MODEL_CARD.md"):
        shutil.copy(ROOT / "models" / name / f, d / f)
    (d / WEIGHTS).symlink_to(ROOT / "models" / name / WEIGHTS)
    return d


def pin(d, precision="bf16", backend="eager", **kw) -> dict:
    p = {"backend": backend, "precision": precision, "needs": needs("cpu", backend, precision),
         "weights_sha256": sha256_file(d / WEIGHTS), "why": "test pin", **kw}
    write_pin(d, "cpu", p)
    return p


def test_auto_is_off_once_backend_or_precision_is_named(monkeypatch):
    assert ModelSettings().auto and ModelSettings(device="cuda").auto
    assert not ModelSettings(precision="fp32").auto and not ModelSettings(backend="eager").auto
    ms = ModelSettings()
    assert ModelSettings.model_validate(ms.model_dump()).auto  # a dump (isolated engines, admin loads) keeps it
    assert not ModelSettings.model_validate(ModelSettings(precision="bf16").model_dump()).auto
    assert _settings(argparse.Namespace(model_dir="models/tiny")).model.auto
    assert not _settings(argparse.Namespace(backend="eager", precision="fp32")).model.auto  # one flag away
    monkeypatch.setenv("WORLDSERVE_MODEL__AUTO", "true")
    assert not _settings(argparse.Namespace(precision="fp32")).model.auto  # a flag beats the env's auto
    monkeypatch.delenv("WORLDSERVE_MODEL__AUTO")
    monkeypatch.setenv("WORLDSERVE_MODEL__PRECISION", "fp32")
    assert not Settings().model.auto


def test_features_and_needs():
    flags = "flags : fpu sse avx2 avx512f avx512_vnni"
    have = machine_features("cpu", flags)
    assert have == {"avx2", "avx512f", "avx512_vnni"}
    assert needs("cpu", "eager", "bf16") == ["avx512_bf16|amx_bf16"]
    assert missing(needs("cpu", "eager", "bf16"), have) == ["avx512_bf16|amx_bf16"]
    assert missing(needs("cpu", "compile", "int8"), have) == []
    assert needs("cpu", "eager", "fp32") == [] and needs("cuda", "tensorrt", "fp8") == ["cuda", "cuda_fp8", "tensorrt"]


def test_no_pin_serves_the_default_and_says_how_to_get_one(tmp_path):
    d = model_dir(tmp_path, "tiny")
    c = choose(ModelSettings(dir=d))
    assert (c.backend, c.precision, c.source) == ("eager", "fp32", "default")
    assert "worldserve tune" in c.why


def test_a_pin_that_holds_is_served_and_reported(tmp_path, caplog):
    d = model_dir(tmp_path, "tiny")
    pin(d, "bf16", needs=[])  # needs nothing: the same on a machine without AVX-512 BF16
    ms = ModelSettings(dir=d, warmup=False)
    with caplog.at_level(logging.INFO, logger="worldserve.runtime"):
        model = prepare(ms)  # resolves ms in place: what build_engine reports in ModelInfo
    assert (ms.backend, ms.precision, ms.auto) == ("eager", "bf16", False)
    assert model.allocate_cache(1).k.dtype == torch.bfloat16
    assert "serving --backend eager --precision bf16 (pin: test pin)" in caplog.text
    # named: the pin is not read
    assert choose(ModelSettings(dir=d, precision="fp32")).source == "named"
    assert choose(ModelSettings(dir=d, backend="eager", precision="fp32")).precision == "fp32"


def test_a_machine_without_the_feature_serves_the_default(tmp_path):
    d = model_dir(tmp_path, "tiny")
    pin(d, "bf16")
    c = choose(ModelSettings(dir=d), features={"avx2", "avx512f"})  # no AVX-512 BF16 / AMX
    assert (c.backend, c.precision, c.source) == ("eager", "fp32", "default")
    assert "lacks avx512_bf16|amx_bf16" in c.why and "pin eager bf16 refused" in c.why


def test_a_pin_whose_quick_gate_fails_is_refused(tmp_path, caplog):
    """The denoiser at bf16 decodes frames ~52 dB from fp32's: a pin that asks for 60 dB is not served."""
    d = model_dir(tmp_path, "denoiser")
    pin(d, "bf16", needs=[], quick_gate={"min_frame_psnr_db": 60.0})
    ms = ModelSettings(dir=d, warmup=False)
    with caplog.at_level(logging.INFO, logger="worldserve.runtime"):
        prepare(ms)
    assert (ms.backend, ms.precision) == ("eager", "fp32")
    assert "pin eager bf16 refused: decoded frames" in caplog.text and "< 60.0 dB" in caplog.text
    pin(d, "bf16", needs=[])  # the default quick gate (40 dB): served
    assert choose(ModelSettings(dir=d)).source == "pin"


def test_stale_unsupported_or_malformed_pins_are_refused(tmp_path):
    d = model_dir(tmp_path, "tiny")
    pin(d, "bf16", weights_sha256="0" * 64)
    assert "other weights" in choose(ModelSettings(dir=d), features={"avx512_bf16"}).why
    pin(d, "fp16", needs=[])  # fp16 cannot serve on a CPU at all (support.problem)
    c = choose(ModelSettings(dir=d))
    assert c.precision == "fp32" and "cannot serve here: fp16 runs on a GPU only" in c.why
    e = model_dir(tmp_path, "denoiser")
    pin(e, "int8", needs=[])  # the denoiser has no dynamics to quantize (support.model_problem)
    assert "quantizes the token model's dynamics" in choose(ModelSettings(dir=e)).why
    (d / PIN_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a serving pin"):
        read_pin(d, "cpu")
    assert "not a serving pin" in choose(ModelSettings(dir=d)).why


def test_pins_of_other_devices_are_kept(tmp_path):
    d = model_dir(tmp_path, "tiny")
    write_pin(d, "cuda:0", {"backend": "compile", "precision": "bf16"})
    pin(d, "int8")
    doc = json.loads((d / PIN_FILE).read_text())
    assert set(doc["pins"]) == {"cpu", "cuda"} and doc["pins"]["cuda"]["backend"] == "compile"
    assert read_pin(d, "cpu")["precision"] == "int8"


def test_a_frame_head_model_serves_eager_only():
    """maskgit decodes in passes of a frame head (`fill`), which the compiled / ONNX / TensorRT step graphs lack:
    refused at start-up by name (it used to fail the engine's first step), so tune never measures it either."""
    from worldserve.model.io import load_model_dir
    from worldserve.runtime.support import model_problem

    m = load_model_dir(ROOT / "models" / "maskgit")
    assert model_problem(m, ModelSettings(backend="eager", precision="bf16")) is None
    for b in ("compile", "onnxruntime", "tensorrt"):
        assert "serve this model with --backend eager" in model_problem(m, ModelSettings(backend=b))


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (ROOT / "models").glob(f"*/{PIN_FILE}")))
def test_shipped_pins_are_fresh(name):
    """A shipped pin names its model's weights (retrained weights without `worldserve tune` would silently serve the
    default), needs only features `choose.needs` knows, and names a combination that serves on its device type."""
    from worldserve.runtime.support import problem

    d = ROOT / "models" / name
    p = read_pin(d, "cpu")
    assert p["weights_sha256"] == sha256_file(d / WEIGHTS), f"{d / PIN_FILE} is stale: run `worldserve tune {d}`"
    assert p["needs"] == needs("cpu", p["backend"], p["precision"]) and p["measured"]["rows"]
    assert problem(ModelSettings(dir=d, backend=p["backend"], precision=p["precision"])) is None


def test_needs_default_to_the_combination_and_empty_means_none(tmp_path):
    d = model_dir(tmp_path, "tiny")
    p = pin(d, "bf16", needs=[])
    assert choose(ModelSettings(dir=d), features=set()).source == "pin"  # a pin that needs nothing
    del p["needs"]
    write_pin(d, "cpu", p)  # no `needs`: what choose.needs says bf16 on a CPU needs
    assert "lacks avx512_bf16|amx_bf16" in choose(ModelSettings(dir=d), features=set()).why
