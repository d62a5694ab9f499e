"""Images stored as bytes inside a data source (Arrow/Parquet columns, tar members): checked
and decoded through the same loader and rules as image files (`data.images`)."""

from __future__ import annotations

import io

import imagesize

from llava_cli.data.images import END_MARKERS, ImageError, load_image, too_large

TAIL_BYTES = 512  # as the file check: the end marker and some zero padding


def check_image_bytes(data: bytes, *, label: str, full: bool = False) -> tuple[int, int]:
    """`images.check_image` for an image held in memory: its decoded (width, height), or
    `ImageError`. Fast: the header, the pixel limit and the end marker; anything unclear (or
    `full`) is decoded by `load_image`, exactly as a file would be."""
    if full:
        return load_image(io.BytesIO(data), label=label).size
    try:
        width, height = imagesize.get(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - imagesize raises on what it cannot parse
        width, height = -1, -1
    if width <= 0 or height <= 0 or not ends_whole(data):
        return load_image(io.BytesIO(data), label=label).size
    if (reason := too_large(width, height)) is not None:
        raise ImageError(label, reason)
    return width, height


def ends_whole(data: bytes) -> bool:
    """Whether the bytes end as a whole image of their format does (the file check's rule)."""
    head = data[:12]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 == len(data)
    marker = next((end for magic, end in END_MARKERS if head.startswith(magic)), None)
    return marker is None or data[-TAIL_BYTES:].rstrip(b"\0").endswith(marker)
