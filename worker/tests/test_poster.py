"""The poster: a JPEG of the video's middle frame, never wider than 640 px."""

from __future__ import annotations

import io
from pathlib import Path

import av

from worker.generator import TestPattern
from worker.poster import JPEG_QSCALE, MAX_POSTER_WIDTH, poster_jpeg


def wide_video(path: Path, width: int, height: int) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(8):
            frame = av.VideoFrame(width, height, "rgb24")
            frame.planes[0].update(bytes([index * 30 % 256]) * (width * height * 3))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def decoded(jpeg: bytes) -> av.VideoFrame:
    with av.open(io.BytesIO(jpeg), "r") as image:
        return next(image.decode(video=0))


class TestPoster:
    def test_a_wide_video_is_scaled_to_640_keeping_its_shape(self, tmp_path: Path) -> None:
        video = wide_video(tmp_path / "wide.mp4", 1280, 720)

        jpeg = poster_jpeg(video)

        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"  # JPEG's SOI and EOI
        frame = decoded(jpeg)
        assert (frame.width, frame.height) == (MAX_POSTER_WIDTH, 360)

    def test_a_small_video_keeps_its_size(self) -> None:
        video = TestPattern().generate("p", None, 2, 42)
        try:
            frame = decoded(poster_jpeg(video))
        finally:
            video.unlink()

        assert (frame.width, frame.height) == (320, 180)

    def test_the_frame_comes_from_the_middle(self, tmp_path: Path) -> None:
        # Frame i is grey level 30*i: the first is black, the middle (4 of 8) is 120.
        video = wide_video(tmp_path / "grey.mp4", 64, 64)

        frame = decoded(poster_jpeg(video))
        first_row = bytes(frame.planes[0])[: frame.width]  # rows may be padded past the width

        assert 100 < sum(first_row) / len(first_row) < 140

    def test_the_jpeg_is_written_at_the_promised_quality_scale(self, tmp_path: Path) -> None:
        video = wide_video(tmp_path / "grey.mp4", 64, 64)

        jpeg = poster_jpeg(video)

        # FFmpeg's MJPEG quantisation table is its base table times the scale: the first AC
        # entry reads 2 x qscale (4 at scale 2, 6 at 3, 10 at 5). Setting PyAV's `qscale` to a
        # number only raises the fixed-quality flag, and the poster came out at scale 2, larger.
        # After the DQT marker: its 2-byte length, the precision/id byte, the DC entry.
        first_ac = jpeg.index(b"\xff\xdb") + 6
        assert jpeg[first_ac] == 2 * JPEG_QSCALE
