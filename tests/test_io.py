"""Tests for a2n.io: every image mode in and out, 16-bit kept, orientation, ICC, DPI, quality, errors."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from a2n import io
from a2n.io import ImageReadError, ImageWriteError, Picture, read_image, write_image

H, W = 20, 24
Y, X = np.mgrid[0:H, 0:W]
RGB8 = np.dstack([X * 10, Y * 12, (X * Y) % 256]).astype(np.uint8)
ALPHA8 = (X * 255 // (W - 1)).astype(np.uint8)
RGB16 = np.dstack([X * 2700 + Y, Y * 3300 + 7, (X * Y * 97) % 65536]).astype(np.uint16)
GRAY16 = (X * 2000 + Y * 500 + 3).astype(np.uint16)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture(autouse=True)
def pixel_limit() -> Iterator[None]:
    """Restore Pillow's decompression-bomb limit after each test."""
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


def png_16bit_gray_alpha(path: Path, gray: np.ndarray, alpha: np.ndarray) -> None:
    """Write a 16-bit gray+alpha PNG by hand (color type 4): neither Pillow nor OpenCV writes one."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = np.dstack([gray, alpha]).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", gray.shape[1], gray.shape[0], 16, 4, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_8bit_modes(tmp_path: Path) -> None:
    """RGB, RGBA, L, LA, 1 and P (with and without transparency) decode to the expected pixels and alpha."""
    rgba = np.dstack([RGB8, ALPHA8])
    Image.fromarray(RGB8).save(tmp_path / "rgb.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(RGB8[..., 0]).save(tmp_path / "l.png")
    Image.fromarray(np.dstack([RGB8[..., 0], ALPHA8])).save(tmp_path / "la.png")
    Image.fromarray(RGB8[..., 0] > 127).save(tmp_path / "one.png")
    palette = Image.fromarray(RGB8).quantize(16)
    palette.save(tmp_path / "p.png")
    palette.save(tmp_path / "p_transparent.png", transparency=0)

    p = read_image(tmp_path / "rgb.png")
    assert np.array_equal(p.pixels, RGB8) and p.alpha is None
    p = read_image(tmp_path / "rgba.png")
    assert np.array_equal(p.pixels, RGB8) and np.array_equal(p.alpha, ALPHA8)
    p = read_image(tmp_path / "l.png")
    assert p.pixels.shape == (H, W) and np.array_equal(p.pixels, RGB8[..., 0]) and p.alpha is None
    p = read_image(tmp_path / "la.png")
    assert np.array_equal(p.pixels, RGB8[..., 0]) and np.array_equal(p.alpha, ALPHA8)
    p = read_image(tmp_path / "one.png")
    assert p.pixels.dtype == np.uint8 and set(np.unique(p.pixels)) == {0, 255}
    p = read_image(tmp_path / "p.png")
    assert p.pixels.shape == (H, W, 3) and p.alpha is None
    assert np.array_equal(p.pixels, np.asarray(palette.convert("RGB")))
    p = read_image(tmp_path / "p_transparent.png")
    assert p.alpha is not None and set(np.unique(p.alpha)) == {0, 255}
    assert np.array_equal(p.alpha == 0, np.asarray(palette) == 0)


def test_cmyk_becomes_rgb_and_drops_its_profile(tmp_path: Path) -> None:
    cmyk = Image.fromarray(RGB8).convert("CMYK")
    fake_cmyk_profile = SRGB[:16] + b"CMYK" + SRGB[20:]
    cmyk.save(tmp_path / "c.tif", icc_profile=fake_cmyk_profile)
    p = read_image(tmp_path / "c.tif")
    assert p.pixels.shape == (H, W, 3) and np.array_equal(p.pixels, np.asarray(cmyk.convert("RGB")))
    write_image(tmp_path / "out.png", p)
    assert "icc_profile" not in Image.open(tmp_path / "out.png").info


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_gray_kept(tmp_path: Path, ext: str) -> None:
    """16-bit gray is read as uint16 (from the file's mode, whatever the values) and written back as 16-bit."""
    dark = (GRAY16 // 256).astype(np.uint16)  # values below 256: still 16-bit
    for name, data in (("g", GRAY16), ("dark", dark)):
        Image.fromarray(data).save(tmp_path / f"{name}{ext}")
        p = read_image(tmp_path / f"{name}{ext}")
        assert p.pixels.dtype == np.uint16 and np.array_equal(p.pixels, data)
        write_image(tmp_path / f"{name}_out{ext}", p)
        back = Image.open(tmp_path / f"{name}_out{ext}")
        assert back.mode == "I;16" and np.array_equal(np.asarray(back), data)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_color_kept_in_rgb_order(tmp_path: Path, ext: str) -> None:
    """16-bit RGB and RGBA (which Pillow would truncate) go through OpenCV with R and B kept straight."""
    rgba16 = np.dstack([RGB16, GRAY16])
    cv2.imwrite(str(tmp_path / f"rgb{ext}"), RGB16[..., ::-1])
    cv2.imwrite(str(tmp_path / f"rgba{ext}"), rgba16[..., [2, 1, 0, 3]])
    p = read_image(tmp_path / f"rgb{ext}")
    assert p.pixels.dtype == np.uint16 and np.array_equal(p.pixels, RGB16) and p.alpha is None
    p = read_image(tmp_path / f"rgba{ext}")
    assert np.array_equal(p.pixels, RGB16) and np.array_equal(p.alpha, GRAY16)
    write_image(tmp_path / f"out{ext}", p)
    back = cv2.imread(str(tmp_path / f"out{ext}"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., [2, 1, 0, 3]], rgba16)


def test_16bit_gray_alpha(tmp_path: Path) -> None:
    """A 16-bit gray+alpha PNG stays gray with its alpha, both 16-bit; it is written as 16-bit RGBA."""
    png_16bit_gray_alpha(tmp_path / "la16.png", GRAY16, RGB16[..., 0])
    p = read_image(tmp_path / "la16.png")
    assert p.pixels.shape == (H, W) and p.pixels.dtype == np.uint16
    assert np.array_equal(p.pixels, GRAY16) and np.array_equal(p.alpha, RGB16[..., 0])
    write_image(tmp_path / "out.png", p)
    back = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., 1], GRAY16) and np.array_equal(back[..., 3], RGB16[..., 0])


def test_float_gray_written_as_16bit(tmp_path: Path) -> None:
    Image.fromarray(GRAY16.astype(np.float32) / 65535).save(tmp_path / "f.tif")
    p = read_image(tmp_path / "f.tif")
    assert p.pixels.dtype == np.float32
    write_image(tmp_path / "out.png", p)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), GRAY16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow_shows_it(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[io.ORIENTATION_TAG] = orientation
    Image.fromarray(np.dstack([RGB8, ALPHA8])).save(tmp_path / "o.png", exif=exif, dpi=(100, 200))
    p = read_image(tmp_path / "o.png")
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    assert np.array_equal(p.pixels, shown[..., :3]) and np.array_equal(p.alpha, shown[..., 3])
    swapped = orientation >= 5
    assert p.pixels.shape[:2] == ((W, H) if swapped else (H, W))
    assert p.dpi == pytest.approx((200, 100) if swapped else (100, 200), abs=0.01)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif"])
def test_icc_profile_and_dpi_carried(tmp_path: Path, ext: str) -> None:
    write_image(tmp_path / f"out{ext}", Picture(RGB8, None, SRGB, (144.0, 72.0)))
    back = Image.open(tmp_path / f"out{ext}")
    assert back.info.get("icc_profile") == SRGB
    if ext != ".webp":  # WebP has no DPI field
        assert back.info["dpi"] == pytest.approx((144, 72), abs=0.01)
    assert back.size == (W, H)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_icc_profile_and_dpi_carried_for_16bit_color(tmp_path: Path, ext: str) -> None:
    """16-bit color and RGBA keep their ICC profile and DPI, and read back bit for bit."""
    for name, alpha in (("rgb", None), ("rgba", GRAY16)):
        write_image(tmp_path / f"{name}{ext}", Picture(RGB16, alpha, SRGB, (300.0, 150.0)))
        back = Image.open(tmp_path / f"{name}{ext}")
        assert back.info.get("icc_profile") == SRGB and back.info["dpi"] == pytest.approx((300, 150), abs=0.05)  # PNG stores pixels per metre
        p = read_image(tmp_path / f"{name}{ext}")
        assert p.pixels.dtype == np.uint16 and np.array_equal(p.pixels, RGB16) and p.icc_profile == SRGB
        assert (p.alpha is None) if alpha is None else np.array_equal(p.alpha, alpha)


def test_formats_and_quality(tmp_path: Path) -> None:
    """Each format holds what it can: 8 bits for JPEG/WebP/BMP, RGB for gray WebP (which has no gray), alpha in WebP."""
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_image(tmp_path / "q30.jpg", Picture(noisy), quality=30)
    write_image(tmp_path / "q95.jpg", Picture(noisy), quality=95)
    assert (tmp_path / "q30.jpg").stat().st_size < (tmp_path / "q95.jpg").stat().st_size
    write_image(tmp_path / "q30.webp", Picture(noisy), quality=30)
    write_image(tmp_path / "q95.webp", Picture(noisy), quality=95)
    assert (tmp_path / "q30.webp").stat().st_size < (tmp_path / "q95.webp").stat().st_size
    write_image(tmp_path / "deep.jpg", Picture(RGB16))
    assert np.abs(np.asarray(Image.open(tmp_path / "deep.jpg")).astype(int) - RGB16 // 257).mean() < 3
    write_image(tmp_path / "gray.webp", Picture(RGB8[..., 0]))
    assert Image.open(tmp_path / "gray.webp").mode == "RGB"
    write_image(tmp_path / "la.webp", Picture(RGB8[..., 0], ALPHA8), quality=100)
    webp = Image.open(tmp_path / "la.webp")
    assert webp.mode == "RGBA" and np.array_equal(np.asarray(webp)[..., 3], ALPHA8)
    write_image(tmp_path / "gray.bmp", Picture(RGB8[..., 0]))
    assert Image.open(tmp_path / "gray.bmp").mode == "L" and np.array_equal(np.asarray(Image.open(tmp_path / "gray.bmp")), RGB8[..., 0])
    write_image(tmp_path / "a.out", Picture(RGB8), "TIFF")
    assert Image.open(tmp_path / "a.out").format == "TIFF"


def test_jpeg_and_bmp_refuse_alpha(tmp_path: Path) -> None:
    """Rather than a black background or a silently dropped alpha, a clear error."""
    with pytest.raises(ImageWriteError, match=r"out\.jpg: JPEG cannot store transparency; .*--format png"):
        write_image(tmp_path / "out.jpg", Picture(RGB8, ALPHA8))
    with pytest.raises(ImageWriteError, match=r"out\.bmp: BMP cannot store transparency"):
        write_image(tmp_path / "out.bmp", Picture(RGB8[..., 0], ALPHA8))
    assert list(tmp_path.iterdir()) == []


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:4000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        "missing.png": "missing.png: no such file",
        "empty.jpg": r"empty.jpg: the file is empty \(0 bytes\)",
        "text.png": "text.png: not an image file",
        "truncated.png": "truncated.png: corrupt, truncated or unsupported image",
    }
    for name, message in cases.items():
        with pytest.raises(ImageReadError, match=message):
            read_image(tmp_path / name)
    cv2.imwrite(str(tmp_path / "deep.png"), RGB16)
    (tmp_path / "deep_truncated.png").write_bytes((tmp_path / "deep.png").read_bytes()[:600])
    with pytest.raises(ImageReadError, match="deep_truncated.png: corrupt or truncated"):
        read_image(tmp_path / "deep_truncated.png")


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    """More pixels than the limit is refused with a pointer to --max-pixels; raising the limit lets it through."""
    Image.fromarray(RGB8).save(tmp_path / "big.png")
    io.set_max_pixels(H * W - 1)
    with pytest.raises(ImageReadError, match=r"big.png: more pixels than the safety limit of 479; .*--max-pixels"):
        read_image(tmp_path / "big.png")
    io.set_max_pixels(H * W)
    assert read_image(tmp_path / "big.png").pixels.shape == (H, W, 3)


def test_writes_are_atomic_and_create_folders(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "out.png"
    write_image(target, Picture(RGB8))
    assert np.array_equal(np.asarray(Image.open(target)), RGB8)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]
    with pytest.raises(ImageWriteError):
        write_image(target, Picture(RGB8, ALPHA8), "JPEG")
    assert np.array_equal(np.asarray(Image.open(target)), RGB8)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ImageWriteError, match=r"a_file/sub: cannot create or write to this folder .*choose another output folder"):
        write_image(tmp_path / "a_file" / "sub" / "out.png", Picture(RGB8))


def test_pil_round_trip() -> None:
    """from_pil and to_pil keep mode, pixels, ICC profile and DPI."""
    img = Image.fromarray(np.dstack([RGB8, ALPHA8]))
    img.info.update(icc_profile=SRGB, dpi=(96, 96))
    back = io.to_pil(io.from_pil(img))
    assert back.mode == "RGBA" and np.array_equal(np.asarray(back), np.asarray(img))
    assert back.info["icc_profile"] == SRGB and back.info["dpi"] == (96, 96)
    with pytest.raises(ImageWriteError, match="16-bit color"):
        io.to_pil(Picture(RGB16))
