"""Print the pip requirements of an image target, read from pyproject.toml (the Dockerfile's builders run it).

    python3 tools/image_requirements.py pyproject.toml [--tensorrt]

Runtime dependencies + the serve and onnx extras + grpcio-tools (the builder generates the gRPC stubs, then removes
it). --tensorrt adds the tensorrt extra unless the base image already has TensorRT bindings. Standard
library only: it runs on the base image's python3 before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import tomllib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pyproject")
    ap.add_argument("--tensorrt", action="store_true")
    a = ap.parse_args()
    with open(a.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    reqs = project["dependencies"] + extras["serve"] + extras["onnx"]
    reqs += [r for r in extras["dev"] if r.startswith("grpcio-tools")]
    if a.tensorrt and importlib.util.find_spec("tensorrt") is None:
        reqs += extras["tensorrt"]
    print("\n".join(reqs))


if __name__ == "__main__":
    main()
