"""Decoding untrusted input images and encoding output PNGs.

Inputs arrive as data URLs or bare base64 of PNG, JPEG or WebP. They are checked for size before
any pixel is decoded, fully decoded once to catch truncation, and turned upright from their EXIF
orientation. Animated images contribute their first frame.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import JobError

ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# Signatures of other image formats, to tell "not accepted" from "not an image".
_OTHER_FORMATS = (b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00", b"8BPS", b"%!PS",
                  b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ", b"qoif", b"\x76\x2f\x31\x01")
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.ASCII)
_MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}

# Our own pixel limit is checked before decoding; Pillow's bomb guard stays as a second line.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


def decode_base64_image(value: str, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode a data URL or bare base64 image into a loaded, upright PIL image.

    Raises :class:`JobError` with ``field`` set for anything that is not a usable image.
    """
    if not isinstance(value, str):
        raise JobError("invalid_type", f"{field}: expected a base64 string or data URL", field)
    payload = value
    match = _DATA_URL.match(value)
    if match:
        mime = _MIME_ALIASES.get(match["mime"].lower(), match["mime"].lower())
        if ";base64" not in match["params"].lower():
            raise JobError("invalid_image", f"{field}: the data URL must be base64-encoded", field)
        if mime and mime not in ACCEPTED_FORMATS.values():
            raise JobError(
                "unsupported_image_type", f"{field}: {mime} is not accepted; send PNG, JPEG or WebP", field
            )
        payload = value[match.end():]
    elif value.startswith("data:"):
        raise JobError("invalid_image", f"{field}: malformed data URL", field)
    payload = "".join(payload.split())
    if not payload:
        raise JobError("invalid_image", f"{field}: the image is empty", field)
    if len(payload) * 3 // 4 > max_bytes:
        raise JobError(
            "image_too_large", f"{field}: the image is larger than the limit of {max_bytes} bytes", field
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise JobError("invalid_base64", f"{field}: not valid base64", field) from None
    return open_image(raw, field, max_pixels)


def open_image(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    """Open image bytes with every check :func:`decode_base64_image` promises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the accepted decoders ever see the bytes.
            image = Image.open(io.BytesIO(raw), formats=tuple(ACCEPTED_FORMATS))
            width, height = image.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise JobError(
                    "image_too_large",
                    f"{field}: {width}x{height} is over the limit of {max_pixels} pixels",
                    field,
                )
            image.load()  # the first frame of an animated image
            image = ImageOps.exif_transpose(image)
    except JobError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise JobError("image_too_large", f"{field}: the image declares more pixels than the limit of "
                       f"{max_pixels}", field) from None
    except UnidentifiedImageError:
        if raw.startswith(_OTHER_FORMATS) or raw[4:12] in (b"ftypavif", b"ftypheic"):
            raise JobError("unsupported_image_type", f"{field}: this image format is not accepted; send PNG, "
                           "JPEG or WebP", field) from None
        raise JobError("invalid_image", f"{field}: not a PNG, JPEG or WebP image", field) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise JobError("invalid_image", f"{field}: the image is truncated or corrupt ({exc})", field) from None
    image.info.pop("exif", None)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode (palette, grayscale, 16-bit, CMYK, alpha) to 8-bit RGB.

    Transparent areas become white, which is what a person sees in most viewers.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode == "F":
        image = image.point(lambda v: v * 255).convert("L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """A single-channel mask read as luminance: white marks the area to repaint.

    Transparent pixels count as white (to be repainted), as in most editors' eraser masks.
    """
    return to_rgb(image).convert("L")


def png_bytes(image: Image.Image, text: dict[str, str] | None = None, compress_level: int = 6) -> bytes:
    """Encode a PNG; the same pixels, text and level always give the same bytes."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
