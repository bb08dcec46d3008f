# worldserve images, one Dockerfile, two targets (docs/deploy.md):
#
#   cpu (default)  docker build -t worldserve:cpu .
#                  Debian + Python 3.11 + the CPU build of torch; backends eager and onnxruntime.
#   gpu            docker build --target gpu -t worldserve:gpu .
#                  NVIDIA TensorRT base (CUDA, TensorRT, Python) + the CUDA build of torch.
#
# Both hold the shipped model (models/tiny), run as an unprivileged user, and start `worldserve` in exec
# form so SIGTERM reaches the server and it drains. The command picks the role:
#   serve (default: front ends + engine in one process) | api --queue redis://… | worker --queue redis://…
#
# Build arguments:
#   BASE_IMAGE        base of the cpu target; any Debian-like image with python3 (3.11 or 3.12) and venv
#   GPU_BASE_IMAGE    base of the gpu target; a CUDA + TensorRT image with python3
#   TORCH_INDEX_URL   where the cpu target gets torch (the CPU-only wheel index); empty: PyPI + PIP_FIND_LINKS
#   GPU_TORCH_INDEX_URL  where the gpu target gets torch; empty: PyPI (whose Linux torch is the CUDA build)
#   PIP_FIND_LINKS    a folder of local wheels (e.g. mounted with `podman build -v DIR:DIR:ro`)
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3

# ------------------------------------------------------------------------------------------------- gpu
FROM ${GPU_BASE_IMAGE} AS gpu-builder
ARG GPU_TORCH_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3-venv for ensurepip (package versions follow the base image's release, hence no pins). The venv
# sees the base image's own Python packages (the TensorRT bindings); Triton comes with the CUDA torch.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv --system-site-packages /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install ${GPU_TORCH_INDEX_URL:+--index-url "$GPU_TORCH_INDEX_URL"} torch==2.13.0 \
 && /opt/venv/bin/python -c "import torch; assert torch.version.cuda, 'gpu target got a CPU-only torch'"
# the dependencies from pyproject.toml, plus the tensorrt extra where the base image has no TensorRT bindings
COPY pyproject.toml /src/
COPY tools/image_requirements.py /src/tools/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 /src/tools/image_requirements.py /src/pyproject.toml --tensorrt >/tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY pyproject.toml README.m[d] /src/
COPY proto/ /src/proto/
COPY tools/gen_proto.py /src/tools/
COPY kernels/ /src/kernels/
COPY service/ /src/service/
WORKDIR /src
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/python tools/gen_proto.py \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip uninstall -y grpcio-tools \
 && /opt/venv/bin/python -c "import worldserve.api.gen.worldserve_pb2_grpc, worldserve.cli.main, worldserve.cli.wiring"
# the shipped model, readable by the unprivileged user whatever the file modes of the checkout
COPY models/tiny/ /opt/model/
RUN chmod -R u=rwX,go=rX /opt/model

FROM ${GPU_BASE_IMAGE} AS gpu
LABEL org.opencontainers.image.title="worldserve" \
      org.opencontainers.image.description="worldserve (gpu): serving for action-conditioned video world models" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's C compiler stays: Triton (torch.compile on CUDA, kernels/) builds its launcher with it
# at run time. Nothing else of the build is carried over: the venv and the model only.
RUN groupadd --gid 10001 worldserve \
 && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin worldserve \
 && mkdir -p /app/artifacts \
 && chown 10001:10001 /app/artifacts
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --from=gpu-builder /opt/model /app/models/tiny
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    WORLDSERVE_SERVER__HOST=0.0.0.0 \
    WORLDSERVE_MODEL__DIR=/app/models/tiny \
    WORLDSERVE_MODEL__ARTIFACT_DIR=/app/artifacts \
    WORLDSERVE_MODEL__DEVICE=cuda
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001 50051
# /readyz of this process's HTTP port (the worker serves it too): set the port with
# WORLDSERVE_SERVER__HTTP_PORT rather than --http-port so that this check follows it; https when
# WORLDSERVE_SERVER__TLS_CERT is set (loopback, certificate not checked). Binding 0.0.0.0 without
# WORLDSERVE_AUTH__API_KEYS logs a SECURITY warning at start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('WORLDSERVE_SERVER__TLS_CERT')); u.urlopen('%s://127.0.0.1:%s/readyz' % ('https' if tls else 'http', os.environ.get('WORLDSERVE_SERVER__HTTP_PORT', '8000')), timeout=4, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["worldserve"]
CMD ["serve"]

# ------------------------------------------------------------------------------------------------- cpu
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch first, in its own layer: the biggest download, and it changes least. Its C++ headers and C++ test
# binaries (~180 MB) go: this image has no compiler to use the headers with (so no torch.compile on CPU:
# the cpu image serves the eager and onnxruntime backends) and the tests are torch's own.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
 && /opt/venv/bin/python -c "import torch; assert torch.version.cuda is None, 'cpu target got a CUDA torch'" \
 && torch_dir=$(/opt/venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__))") \
 && rm -rf "$torch_dir/include" "$torch_dir/test" "$torch_dir"/bin/test_* "$torch_dir"/bin/*Test
# then the dependencies, read from pyproject.toml: this layer is rebuilt only when pyproject.toml changes
COPY pyproject.toml /src/
COPY tools/image_requirements.py /src/tools/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 /src/tools/image_requirements.py /src/pyproject.toml >/tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt
# then the package: gRPC stubs generated first so that they are part of the installed package
COPY pyproject.toml README.m[d] /src/
COPY proto/ /src/proto/
COPY tools/gen_proto.py /src/tools/
COPY kernels/ /src/kernels/
COPY service/ /src/service/
WORKDIR /src
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/python tools/gen_proto.py \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip uninstall -y grpcio-tools \
 && /opt/venv/bin/python -c "import worldserve.api.gen.worldserve_pb2_grpc, worldserve.cli.main, worldserve.cli.wiring"
# the shipped model, readable by the unprivileged user whatever the file modes of the checkout
COPY models/tiny/ /opt/model/
RUN chmod -R u=rwX,go=rX /opt/model

FROM ${BASE_IMAGE} AS cpu
LABEL org.opencontainers.image.title="worldserve" \
      org.opencontainers.image.description="worldserve (cpu): serving for action-conditioned video world models" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 worldserve \
 && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin worldserve \
 && mkdir -p /app/artifacts \
 && chown 10001:10001 /app/artifacts
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/model /app/models/tiny
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    WORLDSERVE_SERVER__HOST=0.0.0.0 \
    WORLDSERVE_MODEL__DIR=/app/models/tiny \
    WORLDSERVE_MODEL__ARTIFACT_DIR=/app/artifacts
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001 50051
# /readyz of this process's HTTP port (the worker serves it too): set the port with
# WORLDSERVE_SERVER__HTTP_PORT rather than --http-port so that this check follows it
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('WORLDSERVE_SERVER__TLS_CERT')); u.urlopen('%s://127.0.0.1:%s/readyz' % ('https' if tls else 'http', os.environ.get('WORLDSERVE_SERVER__HTTP_PORT', '8000')), timeout=4, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["worldserve"]
CMD ["serve"]
