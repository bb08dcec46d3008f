"""Frame encoding on the wire: raw RGB8 (+ shape), PNG or JPEG. No torch.

Decoding is guarded: compressed images have their header read first and are refused when they are
too large in bytes or pixels (decompression bombs are never decoded) or not the model's frame size.
A PNG is walked chunk header by chunk header first (12 bytes each, no data read, a few microseconds per 100
chunks) and refused when it has more than MAX_PNG_CHUNKS chunks: PIL parses every chunk in Python, so 350k empty
chunks (4 MB) cost 0.84 s of CPU (issue 18.9). A JPEG's segments before its first scan are walked the same way
(MAX_JPEG_SEGMENTS: 900k empty comment segments cost PIL 0.64 s). Decoding is also timed against a budget per
frame (`max_ms`, server.max_image_decode_ms): a frame that needs longer is refused. The data plane runs all of this
in its decode threads, never on the event loop.
"""

from __future__ import annotations

import io
import struct
import time
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidArgument
from ..wire import ENCODINGS, IMAGE_ENCODINGS

PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL writes 64 KB IDAT chunks, libpng 8 KB: a 4 MB PNG (max_image_bytes) of 8 KB chunks has 512; 4096 is ample for
# any encoder and walks in ~1 ms; PIL parses that many chunks in ~10 ms.
MAX_PNG_CHUNKS = 4096
MAX_JPEG_SEGMENTS = 1024  # a camera JPEG has ~10-30 before its first scan (EXIF, ICC in 64 KB pieces, tables)


def check_png_chunks(data: bytes, field: str, max_chunks: int = MAX_PNG_CHUNKS) -> None:
    """Refuse a PNG of more than `max_chunks` chunks from its chunk headers alone (stops at the first one over)."""
    if not data.startswith(PNG_SIGNATURE):
        return  # not a PNG: the decoder says what it is
    pos, n, end = len(PNG_SIGNATURE), 0, len(data)
    while pos + 8 <= end:
        n += 1
        if n > max_chunks:
            raise InvalidArgument(f"{field}: PNG has more than {max_chunks} chunks (a well-formed frame has a few "
                                  "dozen): refused before decoding", field)
        (length,) = struct.unpack_from(">I", data, pos)
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + length


def check_jpeg_segments(data: bytes, field: str, max_segments: int = MAX_JPEG_SEGMENTS) -> None:
    """Refuse a JPEG of more than `max_segments` marker segments before its first scan, from the markers alone."""
    if not data.startswith(b"\xff\xd8"):
        return  # not a JPEG: the decoder says what it is
    pos, n, end = 2, 0, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        n += 1
        if n > max_segments:
            raise InvalidArgument(f"{field}: JPEG has more than {max_segments} segments before its image data (a "
                                  "well-formed frame has a few dozen): refused before decoding", field)
        if marker == 0xDA:  # start of scan: entropy-coded data follows, decoded in C
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length


def _budget(t0: float, max_ms: float | None, field: str, encoding: str) -> None:
    # CPU time of the decoding thread, not wall time: under load a thread waits for the GIL and the cores, and a
    # plain 64x64 PNG took 311 ms of wall time at 64 REST clients (refused as if it were a bomb)
    ms = (time.thread_time() - t0) * 1000
    if max_ms is not None and ms > max_ms:
        raise InvalidArgument(f"{field}: the {encoding} image took {ms:.0f} ms to decode, over the {max_ms:g} ms "
                              "budget per frame (server.max_image_decode_ms): send a plainly encoded frame", field)


def decode_frame(encoding: str, data: bytes, height: int, width: int, expect_hw: tuple[int, int],
                 max_pixels: int, max_bytes: int, field: str, max_ms: float | None = None) -> np.ndarray:
    """-> uint8 [H, W, 3] matching expect_hw, or InvalidArgument naming `field` (also when decoding takes longer
    than `max_ms` of this thread's CPU time: checked after the header is parsed and after the pixels are decoded)."""
    t0 = time.thread_time()
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
    if encoding == "png":
        check_png_chunks(data, field)
    elif encoding == "jpeg":
        check_jpeg_segments(data, field)
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
            _budget(t0, max_ms, field, encoding)  # the header (every chunk before the pixels) is parsed by now
            if im.mode == "P":  # palette PNG: an encoding detail, the pixels are RGB
                im = im.convert("RGB")
            if im.mode != "RGB":
                raise InvalidArgument(f"{field}: image has {len(im.getbands())} channel(s) (mode {im.mode}), "
                                      "expected 3 (RGB)", field)
            arr = np.asarray(im, dtype=np.uint8)
            _budget(t0, max_ms, field, encoding)
    except InvalidArgument:
        raise
    except UnidentifiedImageError as e:
        raise InvalidArgument(f"{field}: cannot decode {encoding} image: not a {encoding} file", field) from e
    except Exception as e:  # noqa: BLE001 - untrusted bytes: whatever the decoder raises is the client's error
        msg = str(e)[:200]
        raise InvalidArgument(f"{field}: cannot decode {encoding} image: {type(e).__name__}: {msg}", field) from e
    return arr


PNG_COMPRESS_LEVEL = 1  # zlib's fastest: a 64x64 MiniGrid frame in 78 us vs 254 us at PIL's default 6, 625 vs 494 bytes


def encode_frame(frame: np.ndarray, encoding: str) -> bytes:
    # uint8 [H, W, 3] -> bytes. A PNG is lossless at any level: the front end encodes every streamed frame, so the
    # fastest level (the bytes are a little larger; raw RGB8 is the choice when bytes do not matter)
    if encoding == "raw":
        return np.ascontiguousarray(frame, np.uint8).tobytes()
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(frame).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def decode_any(encoding: str, data: bytes, height: int = 0, width: int = 0) -> np.ndarray:
    """Client side: decode a frame the server sent (trusted sizes)."""
    if encoding == "raw":
        return np.frombuffer(data, np.uint8).reshape(height, width, 3)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
