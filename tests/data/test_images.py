"""Tests for llava_cli.data.images: decoding real-world files and LLaVA's geometry rules."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from llava_cli.data.images import (
    ImageError,
    check_image,
    expand_to_square,
    load_image,
    mean_color,
    prepare_image,
    resolve_image_path,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
RED, BLUE, FILL = (255, 0, 0), (0, 0, 255), (7, 8, 9)
# LLaVA-NeXT's default pinpoints, (width, height).
NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def select_best_resolution(size, pinpoints):
    """transformers' anyres canvas choice (what the LLaVA-NeXT processor tiles to and the model
    unpads by), in LLaVA's (width, height) order; transformers' own is (height, width)."""
    from transformers.image_processing_utils import select_best_resolution as hf_select

    height, width = hf_select((size[1], size[0]), [(h, w) for w, h in pinpoints])
    return width, height


def anyres_grid_shape(size, pinpoints, tile):
    """transformers' anyres tile grid as (columns, rows) for a (width, height) image."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    rows, columns = get_anyres_image_grid_shape((size[1], size[0]),
                                                [[h, w] for w, h in pinpoints], tile)
    return columns, rows


@pytest.fixture(scope="module")
def images(assets: Path) -> Path:
    return assets / "images"


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# --- paths and errors -------------------------------------------------------------------------


def test_resolve_image_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_image_path(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    assert resolve_image_path(tmp_path, "/abs/x.png") == Path("/abs/x.png")
    monkeypatch.chdir(tmp_path)
    assert resolve_image_path(None, "c.jpg") == tmp_path / "c.jpg"
    assert resolve_image_path("sub", "../d.jpg") == tmp_path / "d.jpg"


def test_missing_file_raises_image_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="file not found") as info:
        load_image(missing, label="coco/nope.jpg")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == "coco/nope.jpg" and err.reason == "file not found"
    assert str(err) == f"image 'coco/nope.jpg' (resolved to {missing}): file not found"
    with pytest.raises(ImageError, match="file not found"):
        check_image(missing)


def test_image_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageError("a.jpg", "file not found", "/x/a.jpg")))
    assert (err.path, err.reason, err.resolved) == ("a.jpg", "file not found", "/x/a.jpg")
    assert str(err) == "image 'a.jpg' (resolved to /x/a.jpg): file not found"


def test_not_an_image(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("this is not a JPEG")
    for func in (load_image, check_image):
        with pytest.raises(ImageError, match=r"notes\.jpg.*cannot be decoded"):
            func(bogus)


def test_truncated_jpeg_fails_on_load_and_in_the_fast_check(images: Path) -> None:
    path = images / "extreme_ironing_truncated.jpg"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError, match="cannot be decoded") as info:
        load_image(path)
    assert "extreme_ironing_truncated.jpg" in str(info.value)
    assert "truncated" in info.value.reason
    # We must not flip Pillow's process-wide switch to get there.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # The header is intact, but the file does not end with FFD9: the fast check decodes it.
    with pytest.raises(ImageError) as fast:
        check_image(path)
    assert re.fullmatch(r"cannot be decoded: image file is truncated \(\d+ bytes not processed\)",
                        fast.value.reason)


def test_truncation_allowed_elsewhere_warns(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        load_image(images / "tiny_1x1.png")


# --- header check -----------------------------------------------------------------------------


def test_the_fast_check_decodes_no_whole_file(images: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    def no_decode(self):
        raise AssertionError("the fast check must not decode pixel data of a whole file")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    # Every good shared image ends as its format says (JPEG, PNG, GIF, WebP).
    sizes = {"extreme_ironing.jpg": (570, 380), "cat_tall_500x666.webp": (500, 666),
             "chelsea_cat.png": (451, 300), "camera_grayscale.png": (512, 512),
             "alpaca_rgba.png": (254, 253), "palette_animated.gif": (14, 25),
             "fridge_square.jpg": (900, 900), "ocr_crop_104x27.jpg": (104, 27),
             "tiny_1x1.png": (1, 1)}
    for name, size in sizes.items():
        assert check_image(images / name) == size, name
    monkeypatch.undo()
    assert check_image(images / "extreme_ironing.jpg", full=True) == (570, 380)


# --- modes ------------------------------------------------------------------------------------


def test_rgb_photos_load_unchanged(images: Path) -> None:
    img = load_image(images / "extreme_ironing.jpg")
    assert (img.mode, img.size) == ("RGB", (570, 380))
    with Image.open(images / "chelsea_cat.png") as ref:
        assert np.array_equal(pixels(load_image(images / "chelsea_cat.png")), pixels(ref))


def test_grayscale_becomes_rgb(images: Path) -> None:
    img = load_image(images / "camera_grayscale.png")
    assert (img.mode, img.size) == ("RGB", (512, 512))
    arr = pixels(img)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    with Image.open(images / "camera_grayscale.png") as ref:
        assert np.array_equal(arr[..., 0], pixels(ref))


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 128 * 257, 65535]], dtype=np.uint16)).save(path)
    arr = pixels(load_image(path))
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_palette_gif_first_frame(images: Path) -> None:
    img = load_image(images / "palette_animated.gif")
    assert (img.mode, img.size) == ("RGB", (14, 25))
    with Image.open(images / "palette_animated.gif") as gif:
        first = pixels(gif.convert("RGB"))
        gif.seek(gif.n_frames - 1)
        last = pixels(gif.convert("RGB"))
    assert np.array_equal(pixels(img), first)
    assert not np.array_equal(first, last)  # so the check above really identifies frame 0


def test_rgba_transparent_pixels_become_background(images: Path) -> None:
    path = images / "alpaca_rgba.png"
    with Image.open(path) as ref:
        rgba = pixels(ref.convert("RGBA"))
    transparent = np.argwhere(rgba[..., 3] == 0)
    opaque = np.argwhere(rgba[..., 3] == 255)
    assert len(transparent) and len(opaque)
    out = pixels(load_image(path, background=(1, 2, 3)))
    ty, tx = transparent[len(transparent) // 2]
    oy, ox = opaque[len(opaque) // 2]
    assert tuple(out[ty, tx]) == (1, 2, 3)
    assert tuple(out[oy, ox]) == tuple(rgba[oy, ox, :3])
    assert np.all(out[rgba[..., 3] == 0] == (1, 2, 3))


def test_synthetic_rgba_and_la_compositing(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = pixels(load_image(tmp_path / "a.png", background=(255, 255, 255)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)  # half-transparent black on white

    la = np.array([[[40, 0], [40, 255]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = pixels(load_image(tmp_path / "la.png", background=FILL))
    assert tuple(out[0, 0]) == FILL and tuple(out[0, 1]) == (40, 40, 40)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    out = pixels(load_image(tmp_path / "p.png", background=FILL))
    assert tuple(out[0, 0]) == FILL and tuple(out[0, 1]) == RED


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.tiff")
    img = load_image(tmp_path / "c.tiff")
    assert img.mode == "RGB" and tuple(pixels(img)[0, 0]) == RED


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Left half red, right half blue, stored 40x20; orientation 6 means "rotate 90 deg clockwise
    # to display", which puts the left half on top.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = RED
    arr[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (20, 40)
    out = pixels(img).astype(int)
    assert np.abs(out[10, 10] - RED).max() < 40
    assert np.abs(out[30, 10] - BLUE).max() < 40


def test_tiny_1x1(images: Path) -> None:
    img = load_image(images / "tiny_1x1.png")
    assert (img.mode, img.size) == ("RGB", (1, 1))
    assert expand_to_square(img, FILL) is img
    assert select_best_resolution(img.size, NEXT_PINPOINTS) == (336, 672)


# --- LLaVA geometry ---------------------------------------------------------------------------


def solid(size: tuple[int, int], color=RED) -> Image.Image:
    return Image.new("RGB", size, color)


def test_expand_to_square_wide() -> None:
    out = pixels(expand_to_square(solid((5, 2)), FILL))
    assert out.shape == (5, 5, 3)
    # (w - h) // 2 = 1: row 0 is fill, rows 1-2 image, rows 3-4 fill.
    assert np.all(out[0] == FILL) and np.all(out[1:3] == RED) and np.all(out[3:] == FILL)


def test_expand_to_square_tall() -> None:
    out = pixels(expand_to_square(solid((2, 5)), FILL))
    assert out.shape == (5, 5, 3)
    assert np.all(out[:, 0] == FILL) and np.all(out[:, 1:3] == RED) and np.all(out[:, 3:] == FILL)


def test_expand_to_square_square_and_thin() -> None:
    square = solid((4, 4))
    assert expand_to_square(square, FILL) is square
    out = pixels(expand_to_square(solid((1, 3)), FILL))
    assert out.shape == (3, 3, 3) and np.all(out[:, 1] == RED)
    assert np.all(out[:, 0] == FILL) and np.all(out[:, 2] == FILL)
    with pytest.raises(ValueError, match="RGB"):
        expand_to_square(Image.new("L", (2, 1)), FILL)


def test_mean_color_matches_llava() -> None:
    assert mean_color(CLIP_MEAN) == (122, 116, 104)
    assert mean_color([0.5, 0.5, 0.5]) == (127, 127, 127)
    with pytest.raises(ValueError):
        mean_color([0.5])


def test_prepare_image_policies(images: Path) -> None:
    img = load_image(images / "extreme_ironing.jpg")
    assert prepare_image(img, "square", CLIP_MEAN) is img
    assert prepare_image(img, "anyres", CLIP_MEAN) is img
    padded = prepare_image(img, "pad", CLIP_MEAN)
    assert padded.size == (570, 570)
    assert padded.getpixel((0, 0)) == (122, 116, 104)
    assert padded.getpixel((569, 569)) == (122, 116, 104)
    assert padded.crop((0, 95, 570, 475)).tobytes() == img.tobytes()
    with pytest.raises(ValueError, match="square, pad, anyres"):
        prepare_image(img, "crop", CLIP_MEAN)


def test_select_best_resolution_covers_original() -> None:
    # 570x380 fits fully only in 672x672 (effective 216600 = whole image); the others
    # downscale it (e.g. 672x336 -> 504x336 = 169344).
    assert select_best_resolution((570, 380), NEXT_PINPOINTS) == (672, 672)
    assert anyres_grid_shape((570, 380), NEXT_PINPOINTS, 336) == (2, 2)


def test_select_best_resolution_orientation() -> None:
    # Neither holds 1000x500 at full size; 672x336 keeps 672*336, 336x672 only 336*168.
    assert select_best_resolution((1000, 500), [(336, 672), (672, 336)]) == (672, 336)
    assert select_best_resolution((500, 1000), [(672, 336), (336, 672)]) == (336, 672)
    assert anyres_grid_shape((500, 1000), NEXT_PINPOINTS, 336) == (1, 2)


def test_select_best_resolution_tie_breaks_on_waste() -> None:
    # All three hold 100x50 at full size (effective 5000); wasted areas 15000, 155000, 25000.
    options = [(400, 400), (300, 100), (200, 100)]
    assert select_best_resolution((100, 50), options) == (200, 100)


def test_header_check_falls_back_to_pillow(tmp_path: Path) -> None:
    # imagesize reads JPEG/PNG/WebP/GIF/TIFF headers; a TGA it cannot read is decoded.
    path = tmp_path / "odd.tga"
    Image.new("RGB", (37, 21)).save(path, "TGA")
    assert check_image(path) == (37, 21)
    with pytest.raises(ImageError, match="is a directory"):
        check_image(tmp_path)


# --- the fast check: a file's end ----------------------------------------------------------


def _cut(images: Path, tmp_path: Path, name: str, keep: int | None = None,
         extra: bytes = b"") -> Path:
    """A copy of a shared image, its first `keep` bytes only (None: all), then `extra`."""
    data = (images / name).read_bytes()
    path = tmp_path / f"{keep}-{name}"
    path.write_bytes(data[:keep] + extra)
    return path


TRUNCATED = r"cannot be decoded: image file is truncated \(\d+ bytes not processed\)"


@pytest.mark.parametrize(("keep", "reason"), [
    (2, "cannot be decoded: not a recognised image format"),  # the SOI marker only
    (200, "cannot be decoded: Truncated File Read"),  # inside the header segments
    (700, TRUNCATED), (10000, TRUNCATED), (31293, TRUNCATED),  # the shared truncated file's cut
    (62000, TRUNCATED), (-2, TRUNCATED), (-1, TRUNCATED),  # all but the end marker, or half of it
])
def test_a_jpeg_cut_anywhere_fails_the_fast_check(images, tmp_path, keep, reason):
    path = _cut(images, tmp_path, "extreme_ironing.jpg", keep)
    with pytest.raises(ImageError) as info:
        check_image(path, label="cut.jpg")
    assert re.fullmatch(reason, info.value.reason), info.value.reason
    assert str(info.value).startswith(f"image 'cut.jpg' (resolved to {path}): cannot be decoded")


def test_zero_padding_passes_without_a_decode(images, tmp_path, monkeypatch):
    padded = [_cut(images, tmp_path, name, extra=b"\0" * 300)
              for name in ("extreme_ironing.jpg", "chelsea_cat.png", "palette_animated.gif")]

    def no_decode(self):
        raise AssertionError("a file padded with zeros after its end marker is whole")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert [check_image(p) for p in padded] == [(570, 380), (451, 300), (14, 25)]


def test_data_past_the_end_is_decoded_to_decide(images, tmp_path):
    # A phone's motion photo: a whole JPEG, then a video. It decodes, so it passes.
    motion = _cut(images, tmp_path, "extreme_ironing.jpg",
                  extra=b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 20)
    assert check_image(motion) == (570, 380)
    assert check_image(_cut(images, tmp_path, "cat_tall_500x666.webp", extra=b"xx")) == (500, 666)


def test_truncated_png_gif_and_webp(images, tmp_path):
    half_png = _cut(images, tmp_path, "chelsea_cat.png", 240512 // 2)
    with pytest.raises(ImageError, match="cannot be decoded: image file is truncated"):
        check_image(half_png)
    # A WebP shorter than its RIFF header says: libwebp refuses it.
    with pytest.raises(ImageError, match="cannot be decoded: could not create decoder object"):
        check_image(_cut(images, tmp_path, "cat_tall_500x666.webp", -1))
    with pytest.raises(ImageError, match="not a recognised image format"):
        check_image(_cut(images, tmp_path, "palette_animated.gif", 30))
    # What Pillow decodes in full is what training reads, so it passes: a PNG without its
    # IEND chunk, and half an animated GIF (its first frame is whole).
    assert check_image(_cut(images, tmp_path, "chelsea_cat.png", -12)) == (451, 300)
    assert check_image(_cut(images, tmp_path, "palette_animated.gif", 4438 // 2)) == (14, 25)


def test_full_decode_finds_corrupt_data_inside_a_file_that_ends_well(images, tmp_path):
    import struct
    import zlib

    data = (images / "chelsea_cat.png").read_bytes()
    at = data.index(b"IDAT")
    size = int.from_bytes(data[at - 4:at], "big")
    body = bytearray(data[at + 4:at + 4 + size])
    body[size // 2:size // 2 + 64] = b"\x55" * 64  # garbage in the zlib stream, CRC made good
    chunk = struct.pack(">I", size) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    path = tmp_path / "corrupt.png"
    path.write_bytes(data[:at - 4] + chunk + data[at + 8 + size:])
    assert check_image(path) == (451, 300)  # header and IEND are intact
    with pytest.raises(ImageError) as info:
        check_image(path, full=True)
    assert info.value.reason == ("cannot be decoded: unrecognized data stream contents when "
                                 "reading image file")
