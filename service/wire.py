"""The service's vocabulary on the wire, written once (no torch here): frame modes, priorities, frame
encodings, backends and precisions, with the names REST, gRPC, the client and the settings use for them.

gRPC enums are named `<PREFIX>_<NAME>` in proto/ (FRAMES_ALL, PRIORITY_BULK, Frame.PNG); `proto_map` builds
the name <-> number maps from the generated enum, so no adapter keeps its own table.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal, get_args


class FrameMode(IntEnum):
    ALL = 0  # a frame every step
    LAST = 1  # a frame at the last step only
    NONE = 2  # latent only: reward and done per step


class Priority(IntEnum):
    INTERACTIVE = 0  # sessions: scheduled first
    NORMAL = 1
    BULK = 2


FrameModeName = Literal["all", "last", "none"]
PriorityName = Literal["interactive", "normal", "bulk"]
EncodingName = Literal["raw", "png", "jpeg"]
BackendName = Literal["eager", "compile", "onnxruntime", "tensorrt"]
PrecisionName = Literal["fp32", "fp16", "bf16", "int8", "fp8"]

FRAME_MODES: dict[str, FrameMode] = {m.name.lower(): m for m in FrameMode}
PRIORITIES: dict[str, Priority] = {p.name.lower(): p for p in Priority}
ENCODINGS: tuple[str, ...] = get_args(EncodingName)
IMAGE_ENCODINGS: tuple[str, ...] = tuple(e for e in ENCODINGS if e != "raw")  # PIL-decoded files
BACKENDS: tuple[str, ...] = get_args(BackendName)
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
PROTO_ENCODING = {"raw": "RAW_RGB8", "png": "PNG", "jpeg": "JPEG"}  # proto's Frame.Encoding value names


def name_of(e: FrameMode | Priority) -> str:
    return e.name.lower()


def proto_map(enum_type, prefix: str, names, rename: dict[str, str] | None = None) -> dict[str, int]:
    """{wire name: proto number} from a generated proto enum, whose values are `<prefix><NAME>`."""
    return {n: enum_type.Value(prefix + (rename or {}).get(n, n.upper())) for n in names}
