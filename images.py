"""What an uploaded image really is: its format from the magic bytes, its size from the header.

A small parser, not Pillow, for three reasons. The gateway must judge an image from its first
bytes only (a ranged GET), and Pillow's WebP plugin decodes through libwebp's demuxer, which
refuses a truncated file ("could not create decoder object", tried with Pillow 13 on a 4 KiB
prefix of a 400x300 WebP). The fields needed sit at fixed offsets in each format's header
(PNG's IHDR, WebP's VP8/VP8L/VP8X chunk), or a short walk of JPEG's marker segments. And the
production image would otherwise carry a native image library only to read four numbers.
Each offset below cites its format's specification.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from errors import UploadRefused

PNG, JPEG, WEBP = "image/png", "image/jpeg", "image/webp"
IMAGE_CONTENT_TYPES = (PNG, JPEG, WEBP)
# How much of an upload the gateway reads to judge it. A JPEG's SOF segment follows its APPn
# segments (EXIF, ICC), each at most 64 KiB: 256 KiB covers every ordinary camera file.
HEADER_BYTES = 256 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (ITU T.81 table B.1): C0-CF but DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field: TEM and RST0-7 (T.81 B.1.1.3).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


class InvalidImage(UploadRefused):
    code = "INVALID_IMAGE"
    detail = "The upload is not a PNG, JPEG or WebP image"


@dataclass(frozen=True, slots=True)
class ImageHeader:
    content_type: str
    width: int
    height: int


def read_header(data: bytes) -> ImageHeader:
    """The format and pixel size the first bytes of a file declare; `InvalidImage` otherwise."""
    if data.startswith(_PNG_SIGNATURE):
        return _png(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    raise InvalidImage()


def _png(data: bytes) -> ImageHeader:
    # PNG spec 5.3 and 11.2.2: the first chunk is IHDR, its data width then height (uint32 BE).
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidImage("The PNG has no IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return _checked(PNG, width, height)


def _jpeg(data: bytes) -> ImageHeader:
    """Walk the marker segments (T.81 annex B) to the first SOF: precision, height, width."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise InvalidImage("The JPEG's segments are malformed")
        marker = data[at + 1]
        if marker == 0xFF:  # fill bytes before a marker (T.81 B.1.1.2)
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break  # image data before any frame header: not a JPEG we can size
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in _JPEG_SOF and at + 9 <= len(data):
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return _checked(JPEG, width, height)
        at += 2 + length
    raise InvalidImage("The JPEG has no frame header in its first bytes")


def _webp(data: bytes) -> ImageHeader:
    # RIFF container (Google's "WebP Container Specification"): the first chunk at offset 12.
    chunk, body = data[12:16], data[20:]
    if chunk == b"VP8X" and len(body) >= 10:
        # Canvas width-1 and height-1, 24 bits little-endian, after 4 bytes of flags.
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return _checked(WEBP, width, height)
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        # Lossless bitstream spec 3.1: signature 0x2f, then 14 bits width-1, 14 bits height-1.
        bits = int.from_bytes(body[1:5], "little")
        return _checked(WEBP, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        # RFC 6386 9.1: a 3-byte frame tag, the start code, then 14-bit width and height.
        width, height = struct.unpack("<HH", body[6:10])
        return _checked(WEBP, width & 0x3FFF, height & 0x3FFF)
    raise InvalidImage("The WebP has no image header")


def _checked(content_type: str, width: int, height: int) -> ImageHeader:
    if width < 1 or height < 1:
        raise InvalidImage("The image header declares no pixels")
    return ImageHeader(content_type, width, height)
