"""What turns a prompt into a video: the `Generator` interface, and its default, a test pattern.

A real model plugs in by implementing `Generator` (see the README's worker section). The test
pattern needs no GPU and no weights: a gradient in the seed's colours slides over a progress bar,
the same picture for the same seed (not the same bytes: libx264's output varies from run to
run), so tests can run the whole worker anywhere.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Protocol

WIDTH, HEIGHT, FPS = 320, 180, 12
SCROLL_PX_PER_FRAME = 6
PROGRESS_BAR_PX = 12


class Generator(Protocol):
    """Makes one video. The handler checks the input against `max_duration_sec` first."""

    # The longest video this generator makes; longer requests are refused before any work.
    max_duration_sec: int

    def generate(self, prompt: str, image: bytes | None, duration_sec: int, seed: int) -> Path:
        """Render the video and return the path of an MP4 file the caller may delete.

        `image` is the start image's bytes when the job has an `imageUrl`. Raise on failure: the
        handler reports the exception's message to the user, so keep secrets out of it.
        """
        ...


class TestPattern:
    """The default generator: a 320x180 H.264 pattern, the same picture for the same seed."""

    __test__ = False  # a class named Test* is not a pytest test class
    # Keeps a bogus input from tying up a worker for minutes.
    max_duration_sec = 60

    def generate(self, prompt: str, image: bytes | None, duration_sec: int, seed: int) -> Path:
        handle, name = tempfile.mkstemp(prefix="video-", suffix=".mp4")
        os.close(handle)
        path = Path(name)
        try:
            render_mp4(duration_sec, seed, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path


def render_mp4(duration_sec: int, seed: int, path: Path) -> None:
    """A playable H.264 MP4 at `path`: a gradient in the seed's colours over a progress bar."""
    if duration_sec < 1:
        raise ValueError("durationSec must be at least 1")
    import av  # here, not at the top: the gateway imports this module without PyAV in production

    strip = _gradient_strip(seed)
    frame_count = duration_sec * FPS
    # `+faststart` puts the index first so a browser can play before the download ends; it
    # rewrites the finished file, which needs a real path rather than a BytesIO.
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(frame_count):
            frame = av.VideoFrame(WIDTH, HEIGHT, "rgb24")
            # 320 px * 3 bytes is already 32-byte aligned, so the plane has no row padding.
            frame.planes[0].update(_frame_pixels(strip, index, frame_count))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())  # flush the frames the encoder still holds


def _gradient_strip(seed: int) -> bytes:
    """Two widths of RGB pixels blending through three colours picked by the seed."""
    rng = random.Random(seed)
    colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(3)]
    pixels = bytearray()
    for x in range(2 * WIDTH):
        position = (x % WIDTH) / WIDTH * len(colours)
        start, end = colours[int(position)], colours[(int(position) + 1) % len(colours)]
        blend = position - int(position)
        pixels += bytes(round(a + (b - a) * blend) for a, b in zip(start, end, strict=True))
    return bytes(pixels)


def _frame_pixels(strip: bytes, index: int, frame_count: int) -> bytes:
    # Every row of a frame is the same slice of the strip: cheap to build without numpy.
    offset = (index * SCROLL_PX_PER_FRAME) % WIDTH * 3
    row = strip[offset : offset + WIDTH * 3]
    done = WIDTH * (index + 1) // frame_count
    bar = b"\xff" * 3 * done + b"\x20" * 3 * (WIDTH - done)
    return row * (HEIGHT - PROGRESS_BAR_PX) + bar * PROGRESS_BAR_PX
