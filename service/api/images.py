"""Frame encoding on the wire: raw RGB8 (+ shape), PNG or JPEG. No torch.

Decoding is guarded: compressed images have their header read first and are refused when they are
too large in bytes or pixels (decompression bombs are never decoded) or not the model's frame size.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidArgument
from ..wire import ENCODINGS, IMAGE_ENCODINGS

PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}


def decode_frame(encoding: str, data: bytes, height: int, width: int, expect_hw: tuple[int, int],
                 max_pixels: int, max_bytes: int, field: str) -> np.ndarray:
    """-> uint8 [H, W, 3] matching expect_hw, or InvalidArgument naming `field`."""
    eh, ew = expect_hw
    if len(data) > max_bytes:
        raise InvalidArgument(f"{field}: image is {len(data)} bytes, over the {max_bytes}-byte limit", field)
    if encoding == "raw":
        if (height, width) != (eh, ew):
            raise InvalidArgument(f"{field}: frame is {height}x{width}, the model takes {eh}x{ew}", field)
        if len(data) != eh * ew * 3:
            raise InvalidArgument(
                f"{field}: raw RGB8 frame needs {eh * ew * 3} bytes ({eh}x{ew}x3), got {len(data)}"
                + (" (wrong channel count?)" if len(data) % (eh * ew) == 0 else ""), field)
        return np.frombuffer(data, np.uint8).reshape(eh, ew, 3).copy()
    if encoding not in IMAGE_ENCODINGS:
        raise InvalidArgument(f"{field}: unknown encoding {encoding!r} (use one of {ENCODINGS})", field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[PIL_FORMAT[encoding]])  # png is PNG, jpeg is JPEG
            if im.format != PIL_FORMAT[encoding]:
                raise InvalidArgument(f"{field}: data is {im.format}, not {encoding}", field)
            w, h = im.size
            if w * h > max_pixels:
                raise InvalidArgument(f"{field}: image is {w}x{h} pixels, over the {max_pixels}-pixel limit", field)
            if (h, w) != (eh, ew):
                raise InvalidArgument(f"{field}: frame is {h}x{w}, the model takes {eh}x{ew}", field)
            if im.mode == "P":  # palette PNG: an encoding detail, the pixels are RGB
                im = im.convert("RGB")
            if im.mode != "RGB":
                raise InvalidArgument(f"{field}: image has {len(im.getbands())} channel(s) (mode {im.mode}), "
                                      "expected 3 (RGB)", field)
            arr = np.asarray(im, dtype=np.uint8)
    except InvalidArgument:
        raise
    except UnidentifiedImageError as e:
        raise InvalidArgument(f"{field}: cannot decode {encoding} image: not a {encoding} file", field) from e
    except Exception as e:  # noqa: BLE001 - untrusted bytes: whatever the decoder raises is the client's error
        msg = str(e)[:200]
        raise InvalidArgument(f"{field}: cannot decode {encoding} image: {type(e).__name__}: {msg}", field) from e
    return arr


def encode_frame(frame: np.ndarray, encoding: str) -> bytes:
    # uint8 [H, W, 3] -> bytes
    if encoding == "raw":
        return np.ascontiguousarray(frame, np.uint8).tobytes()
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG" if encoding == "png" else "JPEG", quality=95)
    return buf.getvalue()


def decode_any(encoding: str, data: bytes, height: int = 0, width: int = 0) -> np.ndarray:
    """Client side: decode a frame the server sent (trusted sizes)."""
    if encoding == "raw":
        return np.frombuffer(data, np.uint8).reshape(height, width, 3)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
