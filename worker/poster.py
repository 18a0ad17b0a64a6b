"""The poster: one JPEG frame from the middle of a video, small enough for a grid of jobs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from av.video.codeccontext import VideoCodecContext

# Wide enough for a card in the web app's grid (2x a 320 px column), small enough to stay
# around 20-60 KB.
MAX_POSTER_WIDTH = 640
# FFmpeg's JPEG scale, 2 (best) to 31: 3 looks like the video at a third of quality 2's size.
JPEG_QSCALE = 3


def poster_jpeg(video: Path, max_width: int = MAX_POSTER_WIDTH) -> bytes:
    """A JPEG of the frame at the middle of `video`, scaled down to at most `max_width`."""
    import av  # only the worker has PyAV; the gateway imports the worker package without it

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        middle = (stream.duration or 0) // 2
        # Seeking lands on the keyframe at or before the middle; decode on from there.
        container.seek(middle, stream=stream)
        frame = next(
            (f for f in container.decode(stream) if f.pts is None or f.pts >= middle), None
        )
    if frame is None:
        raise ValueError("The video has no frame to make a poster of")
    width, height = _poster_size(frame.width, frame.height, max_width)
    # Full-range YUV is what JPEG means; the video's limited range would look washed out.
    small = frame.reformat(width=width, height=height, format="yuvj420p")
    # PyAV's stubs type only the codecs they list; "mjpeg" is a video encoder all the same.
    encoder = cast("VideoCodecContext", av.CodecContext.create("mjpeg", "w"))
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = Fraction(1, 1)
    # `qscale` is FFmpeg's fixed-quality flag (AV_CODEC_FLAG_QSCALE), not the scale: set alone,
    # the encoder falls to qmin, 2. Pinning qmin and qmax is what picks the scale.
    encoder.qscale = True
    encoder.options = {"qmin": str(JPEG_QSCALE), "qmax": str(JPEG_QSCALE)}
    packets = encoder.encode(small) + encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def _poster_size(width: int, height: int, max_width: int) -> tuple[int, int]:
    """The frame's size, scaled down to `max_width`; even sides, as 4:2:0 chroma needs."""
    if width <= max_width:
        return width - width % 2, height - height % 2
    scaled_height = round(height * max_width / width)
    return max_width - max_width % 2, max(2, scaled_height - scaled_height % 2)
