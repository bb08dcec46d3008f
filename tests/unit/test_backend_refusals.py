"""A model that is not the token model (the denoiser, a user's model) asked for a quantized precision or a compiled
backend is refused at start-up with a message naming the combination, never an AttributeError later."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from worldserve.model.io import load_model_dir
from worldserve.runtime.support import Unsupported, check_model_supported
from worldserve.settings import ModelSettings


@pytest.fixture(scope="module")
def denoiser():
    return load_model_dir(ROOT / "models" / "denoiser")


@pytest.mark.parametrize("backend,precision", [("eager", "int8"), ("eager", "fp8"), ("compile", "fp32"),
                                               ("onnxruntime", "fp32"), ("tensorrt", "fp32")])
def test_non_token_models_are_refused_for_token_only_paths(denoiser, backend, precision):
    with pytest.raises(Unsupported) as e:
        check_model_supported(denoiser, ModelSettings(backend=backend, precision=precision))
    assert f"--backend {backend}" in str(e.value) and "denoiser" in str(e.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_denoiser_serves_eager(denoiser, precision):
    check_model_supported(denoiser, ModelSettings(precision=precision))


def test_the_token_model_is_never_refused_here():
    tiny = load_model_dir(ROOT / "models" / "tiny")
    for backend in ("eager", "compile", "onnxruntime"):
        check_model_supported(tiny, ModelSettings(backend=backend, precision="int8"))
