"""Image loading and LLaVA-style image preparation.

Only Pillow, numpy and imagesize are imported here, so the dataset scanner and the CLI can use
this module without paying for torch/transformers imports.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import imagesize
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The path rule lives in `image_paths`; these names are read from here too.
from llava_cli.data.image_paths import (  # noqa: F401 - re-exported
    image_base,
    join_image_path,
    resolve_image_path,
)

RGB = tuple[int, int, int]
ASPECT_RATIOS = ("square", "pad", "anyres")
# OpenAI CLIP's normalisation: the default image mean (and pad colour) of LLaVA-1.5's tower.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
# What transparent pixels become: white, as transformers' image processors (`convert_to_rgb`)
# and vLLM make them, so a served model sees what training saw.
TRANSPARENCY_BACKGROUND = (255, 255, 255)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's errors for unreadable or corrupt data (the bombs, over its pixel limit, not OSErrors).
_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, *_BOMBS)
# What a whole file ends with, after any zero padding (every good shared test image does): JPEG's
# end-of-image marker, PNG's IEND chunk (its CRC is fixed), GIF's trailer.
END_MARKERS = ((b"\xff\xd8", b"\xff\xd9"), (b"\x89PNG\r\n\x1a\n", b"\0\0\0\0IEND\xaeB`\x82"),
                (b"GIF8", b";"))
_TAIL_BYTES = 512  # the end read by the fast check: the marker and some zero padding


class ImageError(ValueError):
    """An image file that is missing, cannot be decoded or is refused (too large); the message
    is about the file only: callers add the dataset record id."""

    def __init__(self, path: str | os.PathLike[str], reason: str, resolved: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.resolved = resolved
        where = f" (resolved to {resolved})" if resolved and resolved != self.path else ""
        super().__init__(f"image '{self.path}'{where}: {reason}")

    def __reduce__(self):
        # Keep the exception picklable across DataLoader worker processes.
        return (type(self), (self.path, self.reason, self.resolved))


def _error(path: object, label: str | None, exc: BaseException) -> ImageError:
    """Translate an exception raised while reading ``path`` into an ImageError."""
    resolved = os.path.abspath(path) if isinstance(path, (str, os.PathLike)) else None
    shown = label if label is not None else str(path)
    if isinstance(exc, FileNotFoundError):
        reason = "file not found"
    elif isinstance(exc, IsADirectoryError):
        reason = "is a directory, not a file"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "cannot be decoded: not a recognised image format"
    elif isinstance(exc, _BOMBS):  # Pillow's message lacks the sides: the header has them
        reason = too_large(*_header_sides(resolved)) or f"image too large: {exc}"
    else:
        reason = f"cannot be decoded: {exc}"
    return ImageError(shown, reason, resolved)


def too_large(width: int, height: int) -> str | None:
    """Why an image this size is refused (over Pillow's MAX_IMAGE_PIXELS, read now), or None."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return None
    return (f"image too large ({width}×{height} = {width * height:,} pixels > limit of "
            f"{limit:,}, PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb, or a picture to "
            "shrink before training")


def open_regular(path: str | os.PathLike[str], label: str | None = None) -> BinaryIO:
    """`path` opened for reading when it is a regular file; `ImageError` for anything else
    (missing, a directory, a FIFO, a device such as /dev/stdin, a socket), whatever the
    path's name. Opened without blocking and checked on the open descriptor, so a FIFO is
    never waited on and nothing can swap the file between the check and the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _error(path, label, exc) from exc
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    os.close(fd)
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device")
    shown = str(path) if label is None else label
    raise ImageError(shown, f"is {kind}, not a file: refused (only regular image files are "
                     "read, even with images allowed outside the folder)", os.path.abspath(path))


def check_image(source: str | os.PathLike[str] | bytes, *, label: str | None = None,
                full: bool = False) -> tuple[int, int]:
    """The data check of one image (`inspect-data --check`, training's pre-checks, the QA
    readers): its ``(width, height)`` as decoded (EXIF orientation applied), or
    :class:`ImageError`. `source`: an image file's path, or the bytes of an image embedded in
    a data source (Arrow/Parquet columns, tar members): one check for both.

    Fast (default): the header, Pillow's pixel limit from its size (`too_large`: a bomb is
    never decoded) and the data's end (`_ends_whole`); a header `imagesize` cannot read, or an
    end unlike a whole file's (a phone's motion photo has a video after it), is decoded to
    decide. ``full`` decodes everything, also finding corrupt data inside. ``label`` names
    the image in error messages (default: ``path``). Only regular files are opened.
    """
    embedded = isinstance(source, bytes)
    shown = label if label is not None else "<embedded image>" if embedded else str(source)

    def decoded_size() -> tuple[int, int]:
        return (load_image(io.BytesIO(source), label=shown) if embedded  # type: ignore[arg-type]
                else load_image(source, label=label)).size

    if full:
        return decoded_size()
    if embedded:
        sides = _header_sides(io.BytesIO(source))
        whole = _ends_whole(source[:12], len(source), source[-_TAIL_BYTES:])
    else:
        with open_regular(source, label) as handle:
            fd, size = handle.fileno(), os.fstat(handle.fileno()).st_size
            whole = _ends_whole(os.pread(fd, 12, 0), size,
                                os.pread(fd, _TAIL_BYTES, max(0, size - _TAIL_BYTES)))
            # By its absolute path, now known to be a regular file: imagesize before 2.0 takes
            # no open file (pyproject allows 1.4).
            sides = _header_sides(os.path.abspath(source))
    width, height = sides
    if width <= 0 or height <= 0 or not whole:
        return decoded_size()  # a bomb is refused before its decode
    if (reason := too_large(width, height)) is not None:
        raise ImageError(shown, reason, None if embedded else os.path.abspath(source))
    return width, height


def _header_sides(source: str | BinaryIO | None) -> tuple[int, int]:
    """The header's size by `imagesize` (0.027-0.038 ms a JPEG against Pillow's 0.063-0.084 ms,
    measured here over 3,762 files), or (-1, -1). An absolute path (imagesize fetches a
    string starting "http://"), or bytes in a stream (imagesize 2.0 and later)."""
    if source is None:
        return -1, -1
    try:
        if not isinstance(source, str):
            source.seek(0)
        return imagesize.get(source)
    except Exception:  # noqa: BLE001 - imagesize raises on what it cannot parse
        return -1, -1


def _ends_whole(head: bytes, size: int, tail: bytes) -> bool:
    """Whether data of `size` bytes starting with `head` (12 bytes) and ending with `tail`
    ends as a whole one of its format does (`END_MARKERS`; a WebP is as long as its RIFF
    header says); True for formats without such a rule. Files are read at given offsets: 10
    µs an image less than a Python file object's seeks (measured here)."""
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 == size
    marker = next((end for magic, end in END_MARKERS if head.startswith(magic)), None)
    return marker is None or tail.rstrip(b"\0").endswith(marker)


def load_image(
    path: object,  # a path, or a binary file object (images embedded in a data source)
    background: RGB = (255, 255, 255),
    *,
    label: str | None = None,
) -> Image.Image:
    """Fully decode an image and return it in RGB mode.

    EXIF orientation is applied, animated images give their first frame, and transparent
    pixels are composited onto ``background``. Truncated or corrupt files, and images over
    Pillow's pixel limit (never decoded), raise :class:`ImageError` here instead of being
    half-decoded later in a DataLoader worker. ``label`` names the image in error messages.
    """
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be an (r, g, b) tuple of 0-255 ints, got {background}")
    _warn_if_truncation_allowed()
    with warnings.catch_warnings():
        # Pillow only warns from 1x to 2x its pixel limit: an error here, in this block only
        # (the process's own warning filters are left as they are).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with _opened(path, label) as source, Image.open(source) as img:
                if getattr(img, "is_animated", False):
                    img.seek(0)
                # load() decodes every byte now, so truncation raises inside this try block.
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img, background)
        except ImageError:
            raise  # already said (`open_regular`)
        except _DECODE_ERRORS as exc:
            raise _error(path, label, exc) from exc


def _opened(path: object, label: str | None) -> BinaryIO:
    """A file object for `load_image`: a path opened by `open_regular`, or the caller's own
    (not closed here: `nullcontext`)."""
    from contextlib import nullcontext

    if isinstance(path, (str, os.PathLike)):
        return open_regular(path, label)
    return nullcontext(path)  # type: ignore[return-value]


def _warn_if_truncation_allowed() -> None:
    # We never change this global; but if other code set it, Pillow pads truncated data
    # silently and we cannot tell, so say so rather than pretend the check still works.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated "
                      "images will be padded silently instead of raising ImageError",
                      RuntimeWarning, stacklevel=3)


def to_rgb(img: Image.Image, background: RGB = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto ``background``."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        # Palette/colour-key transparency (PNG tRNS, GIF): turn it into a real alpha channel.
        img = img.convert("RGBA")
    if img.mode == "La":
        img = img.convert("LA")  # Pillow has no direct premultiplied La -> RGBA conversion
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")  # also un-premultiplies RGBa
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        # Alpha-blend rather than drop alpha: a transparent pixel must become the background.
        # alpha_composite, as transformers' convert_to_rgb does: the same rounding, bit for bit.
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float grayscale to 8-bit L.

    Pillow's own convert() clips instead of scaling, which turns 16-bit images almost white.
    16-bit modes are scaled by 255/65535; mode I is treated as 16-bit when it exceeds 255;
    mode F is treated as [0, 1] when its maximum is <= 1, else as [0, 255] (best effort).
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        finite_max = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    arr = np.nan_to_num(arr * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def mean_color(image_mean: Sequence[float]) -> RGB:
    """Return LLaVA's pad colour: the processor's mean (in [0, 1]) times 255, truncated."""
    if len(image_mean) != 3:
        raise ValueError(f"image_mean must have 3 values (R, G, B), got {list(image_mean)}")
    r, g, b = (int(x * 255) for x in image_mean)
    return (r, g, b)


def expand_to_square(img: Image.Image, fill: RGB) -> Image.Image:
    """LLaVA's ``expand2square``: centre ``img`` on a square ``fill``-coloured canvas.

    The side is max(w, h); offsets are exactly LLaVA's, i.e. ``(0, (w - h) // 2)`` for wide
    and ``((h - w) // 2, 0)`` for tall images. A square image is returned unchanged.
    """
    if img.mode != "RGB":
        raise ValueError(f"expand_to_square expects an RGB image, got mode {img.mode!r}")
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    offset = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    canvas.paste(img, offset)
    return canvas


def prepare_image(img: Image.Image, aspect_ratio: str, image_mean: Sequence[float]) -> Image.Image:
    """Apply the LLaVA ``image_aspect_ratio`` policy before the image processor runs.

    'square' and 'anyres' return ``img`` unchanged (the processor resizes/crops, or the
    LLaVA-NeXT processor tiles it); 'pad' pads to a square with the mean colour.
    """
    if aspect_ratio == "pad":
        return expand_to_square(img, mean_color(image_mean))
    if aspect_ratio in ("square", "anyres"):
        return img
    raise ValueError(
        f"unknown image aspect ratio {aspect_ratio!r}; valid: {', '.join(ASPECT_RATIOS)}"
    )


@dataclass(frozen=True)
class ImageLoader:
    """Images as the model sees them, the one way for training and for generation alike:
    decoded (EXIF orientation applied, first frame), transparency composited onto white (as
    the saved processor, stock transformers and vLLM do it), then the `aspect_ratio` policy
    (`prepare_image`: `pad` fills with the processor's mean colour, as LLaVA and the saved
    processor's `do_pad` do)."""

    aspect_ratio: str = "pad"
    image_mean: tuple[float, ...] = CLIP_MEAN
    background: RGB = TRANSPARENCY_BACKGROUND  # what transparent pixels become

    def open(self, path: str | os.PathLike[str], label: str | None = None) -> Image.Image:
        """Decode the file at `path` and prepare it (raises `ImageError`)."""
        return self._policy(self.decode(path, label))

    def decode(self, path: str | os.PathLike[str], label: str | None = None) -> Image.Image:
        """The file at `path` in RGB at its own size, not yet prepared (`load_image`)."""
        return load_image(path, self.background, label=label)

    def prepare(self, image: Image.Image) -> Image.Image:
        """Prepare an image that is already decoded (any Pillow mode)."""
        return self._policy(to_rgb(image, self.background))

    def _policy(self, image: Image.Image) -> Image.Image:
        return prepare_image(image, self.aspect_ratio, self.image_mean)
