"""Hostile and unusual input images: each gets a clear error or a documented handling."""

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from fluxworker.config import LimitsConfig
from fluxworker.errors import JobError
from fluxworker.images import to_mask, to_rgb
from fluxworker.jobs import parse_job

LIMITS = LimitsConfig()


def encode(image: Image.Image, fmt: str, **params) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return base64.b64encode(buffer.getvalue()).decode()


def decode(value: str, limits=LIMITS):
    return parse_job({"prompt": "x", "image": value}, limits).image


def refused(value: str, code: str, limits=LIMITS):
    with pytest.raises(JobError) as caught:
        decode(value, limits)
    assert (caught.value.code, caught.value.field) == (code, "image"), caught.value
    return caught.value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> str:
    """A tiny PNG file that declares huge dimensions (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    data += png_chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def test_declared_dimensions_over_the_limit_are_refused_before_decoding():
    error = refused(declared_png(100_000, 100_000), "image_too_large")
    assert "pixels" in error.message
    error = refused(declared_png(5000, 5000), "image_too_large", LimitsConfig(max_image_pixels=4000 * 4000))
    assert "5000x5000" in error.message


def test_a_real_decompression_bomb_is_refused():
    # 20000 x 20000 of one colour compresses to a few hundred kilobytes.
    bomb = Image.new("L", (20_000, 20_000), 0)
    refused(encode(bomb, "PNG", optimize=False, compress_level=9), "image_too_large")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt):
    raw = base64.b64decode(encode(Image.effect_noise((128, 128), 60).convert("RGB"), fmt))
    refused(base64.b64encode(raw[: len(raw) // 3]).decode(), "invalid_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_corrupt_bodies_are_refused_or_decode_to_an_image_of_the_declared_size(fmt):
    """Some decoders tolerate damaged data (lossy WebP and JPEG repaint it); either way the
    answer is a clean refusal or a usable image, never a crash."""
    raw = bytearray(base64.b64decode(encode(Image.effect_noise((64, 64), 60).convert("RGB"), fmt)))
    for index in range(len(raw) // 2, len(raw) - 16):
        raw[index] ^= 0x5A
    try:
        image = decode(base64.b64encode(bytes(raw)).decode())
    except JobError as error:
        assert error.code == "invalid_image"
    else:
        assert image.size == (64, 64) and to_rgb(image).mode == "RGB"


@pytest.mark.parametrize("fmt, payload", [
    ("GIF", None), ("BMP", None), ("TIFF", None), ("ICO", None),
])
def test_other_formats_are_refused_as_unsupported(fmt, payload):
    refused(encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt), "unsupported_image_type")


def test_an_animated_gif_is_refused_and_an_animated_webp_gives_its_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    refused(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "unsupported_image_type")
    image = decode(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert image.size == (32, 32)
    assert to_rgb(image).getpixel((16, 16)) == (255, 0, 0)


@pytest.mark.parametrize("mode, fmt", [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
    ("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "WEBP"), ("L", "WEBP"),
])
def test_every_mode_becomes_8_bit_rgb(mode, fmt):
    source = Image.new(mode, (24, 16))
    image = decode(encode(source, fmt))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (24, 16)
    assert to_mask(image).mode == "L"


def test_sixteen_bit_values_are_scaled_not_clipped():
    source = Image.new("I;16", (8, 8), 65535)
    assert to_rgb(decode(encode(source, "PNG"))).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.new("I;16", (8, 8), 32896)  # 128 * 257
    assert to_rgb(decode(encode(mid, "PNG"))).getpixel((0, 0)) == (128, 128, 128)


def test_transparent_pixels_become_white():
    source = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert to_rgb(decode(encode(source, "PNG"))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(decode(encode(palette, "PNG", transparency=0))).getpixel((0, 0)) == (255, 255, 255)


def test_a_one_pixel_image_is_accepted():
    assert decode(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")).size == (1, 1)


def test_exif_orientation_is_applied_for_every_rotation():
    source = Image.new("RGB", (40, 20), (0, 0, 0))
    source.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left
    for orientation, size in ((1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = decode(encode(source, "JPEG", exif=exif, quality=95))
        assert image.size == size, orientation


def test_junk_with_an_image_mime_type_is_invalid():
    refused("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode(),
            "invalid_image")
