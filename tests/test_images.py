"""images.py reads what Pillow writes: the format from the magic bytes, the size from the header."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from images import HEADER_BYTES, ImageHeader, InvalidImage, read_header
from tests.images import image_bytes, png

SIZES = [(1, 1), (64, 36), (1001, 7), (16383, 2)]
# Each way Pillow writes the three formats: WebP lossy (VP8), lossless (VP8L), extended (VP8X).
VARIANTS = [
    ("PNG", "image/png", {}),
    ("JPEG", "image/jpeg", {}),
    ("JPEG", "image/jpeg", {"progressive": True}),
    ("WEBP", "image/webp", {}),
    ("WEBP", "image/webp", {"lossless": True}),
    ("WEBP", "image/webp", {"exif": Image.Exif().tobytes() + b"\0" * 8}),
]


class TestReadHeader:
    @pytest.mark.parametrize(("fmt", "content_type", "options"), VARIANTS)
    @pytest.mark.parametrize(("width", "height"), SIZES)
    def test_agrees_with_pillow(
        self, fmt: str, content_type: str, options: dict[str, Any], width: int, height: int
    ) -> None:
        data = image_bytes(fmt, width, height, **options)
        assert read_header(data[:HEADER_BYTES]) == ImageHeader(content_type, width, height)

    def test_a_jpeg_sized_after_a_large_exif_segment(self) -> None:
        exif = Image.Exif()
        exif[0x010E] = "x" * 60_000  # ImageDescription: a 60 KB APP1 before the frame header
        data = image_bytes("JPEG", 640, 480, exif=exif.tobytes())
        assert read_header(data[:HEADER_BYTES]) == ImageHeader("image/jpeg", 640, 480)

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"GIF89a" + b"\0" * 20,
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            png()[:20],  # the PNG signature, cut inside IHDR
            b"\xff\xd8\xff\xda" + b"\0" * 20,  # scan data before any frame header
            b"\xff\xd8\xff\xe0\x00\x10JFIF",  # a JPEG cut before its frame header
            b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 16,  # no VP8 start code
            png()[:16] + b"\0" * 8,  # IHDR declaring 0x0 pixels
        ],
    )
    def test_refuses_what_is_not_a_sized_image(self, data: bytes) -> None:
        with pytest.raises(InvalidImage) as refused:
            read_header(data)
        assert (refused.value.status_code, refused.value.code) == (400, "INVALID_IMAGE")
