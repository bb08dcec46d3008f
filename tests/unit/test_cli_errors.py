"""A configuration that cannot serve stops the command line at start-up with its message, never a traceback:
library code raises ConfigurationError, `worldserve` turns it into SystemExit naming the command."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL_DIR
from worldserve.cli.main import main


@pytest.mark.parametrize("argv, says", [
    (["serve", "--preset", "nope"], "worldserve serve: unknown preset 'nope'"),
    (["serve", "--model-dir", str(MODEL_DIR), "--backend", "onnxruntime", "--precision", "bf16"],
     "worldserve serve: unsupported configuration --device cpu --backend onnxruntime --precision bf16"),
    (["eval", str(MODEL_DIR.parent / "no-such-model")], "worldserve eval: "),
])
def test_configuration_errors_exit_with_their_message(argv, says):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith(says), e.value.code
