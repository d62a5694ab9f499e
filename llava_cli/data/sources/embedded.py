"""Images stored as bytes inside a data source (Arrow/Parquet columns, tar members): checked
and decoded by the one image check and loader of image files (`data.images.check_image`)."""

from __future__ import annotations

from llava_cli.data.images import check_image


def check_image_bytes(data: bytes, *, label: str, full: bool = False) -> tuple[int, int]:
    """`images.check_image` of an image held in memory: its decoded (width, height), or
    `ImageError`."""
    return check_image(data, label=label, full=full)
