"""Generate the Python gRPC stubs from proto/ into service/api/gen/ (run by make and the Dockerfile)."""

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto" / "worldserve" / "v1"
OUT = ROOT / "service" / "api" / "gen"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "__init__.py").touch()
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{SRC}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
                      f"--grpc_python_out={OUT}", *[str(p) for p in SRC.glob("*.proto")]])
    if rc != 0:
        return rc
    for f in OUT.glob("*_pb2_grpc.py"):  # make the generated import package-relative
        f.write_text(re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", f.read_text(), flags=re.M))
    print(f"generated stubs in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
