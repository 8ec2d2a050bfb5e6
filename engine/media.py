"""Frames in (video file, image, folder of images) and overlay video out, with clear errors."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class MediaError(Exception):
    """Input that cannot be read as frames; the message is meant for the user as it is."""


def _av():
    """PyAV, imported only when a video file is read or written: images and image folders need none."""
    try:
        import av
    except ImportError as exc:
        raise MediaError(f"reading or writing video needs PyAV (pip install av): {exc}") from None
    return av


@dataclass
class Frame:
    index: int
    pts: float | None  # seconds from the start of the stream (None for still images)
    rgb: np.ndarray  # (H, W, 3) uint8
    name: str  # file name for images, "" for video frames
    decode_ms: float = 0.0


class MediaSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise MediaError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            self.kind = "folder"
            self.images = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.images:
                raise MediaError(f"{self.path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            self.count, self.fps = len(self.images), None
        elif self.path.suffix.lower() in IMAGE_SUFFIXES:
            self.kind = "image"
            self.images = [self.path]
            self.count, self.fps = 1, None
        else:
            self.kind = "video"
            self._probe_video()

    def _probe_video(self) -> None:
        av = _av()
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise MediaError(f"{self.path}: has no video stream")
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate) if stream.average_rate else None
                self.count = stream.frames or None
        except MediaError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"{self.path}: not a readable video ({_reason(exc)})") from None

    def frames(self) -> Iterator[Frame]:
        if self.kind == "video":
            yield from self._video_frames()
        else:
            for i, p in enumerate(self.images):
                t0 = time.perf_counter()
                yield Frame(i, None, load_image(p), p.name, (time.perf_counter() - t0) * 1e3)

    def _video_frames(self) -> Iterator[Frame]:
        av = _av()
        n = 0
        errors = 0
        try:
            container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as exc:
            raise MediaError(f"{self.path}: not a readable video ({_reason(exc)})") from None
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base
            packets = container.demux(stream)
            while True:
                t0 = time.perf_counter()
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:
                    raise MediaError(f"{self.path}: corrupt video stream after {n} frames ({_reason(exc)})") from None
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError:
                    errors += 1  # one damaged packet: skip it, the stream may recover at the next keyframe
                    if errors > 50 and n == 0:
                        break
                    continue
                for frame in decoded:
                    rgb = frame.to_ndarray(format="rgb24")
                    pts = float(frame.pts * tb) if frame.pts is not None and tb is not None else None
                    yield Frame(n, pts, rgb, "", (time.perf_counter() - t0) * 1e3)
                    n += 1
                    t0 = time.perf_counter()
        if n == 0:
            detail = f" ({errors} undecodable packets)" if errors else ""
            raise MediaError(f"{self.path}: video has no decodable frames{detail}")


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


class VideoWriter:
    """H.264 mp4 writer for overlay frames (sizes rounded down to even, as yuv420p needs)."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        self._av = _av()
        self.container = self._av.open(str(path), mode="w")
        rate = max(1, int(round(fps or 25)))
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width - width % 2, height - height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}

    def write(self, rgb: np.ndarray) -> None:
        h, w = self.stream.height, self.stream.width
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
