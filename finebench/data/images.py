"""One image as the store keeps it: its encoded bytes (as given unless resized) and its size.

The size is read from the header only. For a baseline JPEG that is the SOF segment, found by walking the
segment lengths before the image data (``jpeg_size``): a few ``struct`` reads, where ``PIL.Image.open``
parses every segment (quantisation tables, APP blocks) in Python and was a third of ``prepare``'s time on
small iNat JPEGs (benchmarks/prepare_speed.py). Anything the walk does not recognise, and every other
format, is opened by PIL as before, so the two agree on every image PIL accepts.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from finebench.data.builders.base import ImageSource

_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
"""Start-of-frame markers (every JPEG coding process; not DHT 0xC4, JPG 0xC8, DAC 0xCC)."""
_SOS = 0xDA
_PIL_LAYERS = (1, 3, 4)
"""Component counts PIL opens (it refuses the others, and so must this path, by leaving them to PIL)."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its last frame header before the scan, as PIL reports it; ``None``
    when ``data`` is not a JPEG this simple walk understands (then PIL decides)."""
    if data[:2] != b"\xff\xd8":
        return None
    size = None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
            continue
        if marker == _SOS:
            return size
        if not (0xC0 <= marker <= 0xCF or 0xDB <= marker <= 0xDF or 0xE0 <= marker <= 0xEF or marker == 0xFE):
            return None  # a marker without a length (RSTn, TEM) or none at all: PIL's finer rules decide
        (length,) = struct.unpack_from(">H", data, position + 2)
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if length < 8 or position + 10 > end:
                return None
            bits, height, width, layers = struct.unpack_from(">BHHB", data, position + 4)
            if bits != 8 or layers not in _PIL_LAYERS or not width or not height:
                return None
            size = (width, height)
        position += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header; PIL's error (an ``OSError``) for what is not an image."""
    size = jpeg_size(data)
    if size is not None:
        return size
    with Image.open(io.BytesIO(data)) as opened:
        return opened.size


def _encode_array(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _resize_if_needed(data: bytes, max_side: int | None, short_side: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """Shrink so the longest side is at most ``max_side`` and the shortest at most ``short_side``
    (never enlarge); JPEGs stay JPEG (q95), anything else becomes PNG."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        scale = min(max_side / max(size) if max_side else 1.0, short_side / min(size) if short_side else 1.0)
        if scale >= 1:
            return data, size
        new_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        is_jpeg = image.format == "JPEG"
        resized = image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).resize(
            new_size, Image.BICUBIC, reducing_gap=3.0
        )
    buffer = io.BytesIO()
    if is_jpeg:
        resized.save(buffer, format="JPEG", quality=95)
    else:
        resized.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), new_size


def encode_image(
    image: ImageSource, max_side: int | None = None, short_side: int | None = None
) -> tuple[bytes, tuple[int, int]]:
    """Encoded bytes and (width, height). File and byte inputs are kept as they are unless resized.

    ``short_side`` stores images at training scale (256 for the 224 recipes, which resize the
    shorter side to 256 anyway): every later decode is then cheaper, on the CPU and on the GPU."""
    if isinstance(image, Path):
        data = image.read_bytes()
    elif isinstance(image, bytes):
        data = image
    elif isinstance(image, np.ndarray):
        data = _encode_array(image)
    elif isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
    else:
        raise TypeError(f"unsupported image source {type(image).__name__}")
    if max_side is not None or short_side is not None:
        return _resize_if_needed(data, max_side, short_side)
    if isinstance(image, np.ndarray):
        return data, (image.shape[1], image.shape[0])
    return data, image_size(data)
