"""Real image files for the upload tests, made by Pillow (the gateway itself reads headers only)."""

from __future__ import annotations

import io

from PIL import Image


def image_bytes(fmt: str = "PNG", width: int = 64, height: int = 36, **options: object) -> bytes:
    picture = Image.new("RGB", (width, height), (200, 80, 40))
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(width: int = 64, height: int = 36) -> bytes:
    return image_bytes("PNG", width, height)
