"""A Python WebRTC client for the live server: streams a video file as a camera at a fixed frame rate,
collects the coefficient messages and the returned video, and times each frame from the moment it is
handed to the encoder to the moment its message arrives. Used by the tests and by `facestream bench-live`.

Matching messages to frames: outgoing frames carry pts = k * 3000 on a 90 kHz clock starting at 0; the
receiver reports RTP timestamps relative to the first one it saw, so a message's `pts` is the pts of the
frame it describes.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from fractions import Fraction

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

CLOCK = 90000


def load_frames(path: str, max_frames: int = 150, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """RGB frames of a video file (first `max_frames`), optionally resized to `size` (w, h)."""
    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            if size is not None:
                frame = frame.reformat(width=size[0], height=size[1])
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return frames


class FileCameraTrack(MediaStreamTrack):
    """Plays RGB frames in a loop at `fps`, like a webcam; records when each frame left for the encoder."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0, limit: int | None = None):
        super().__init__()
        self.frames = frames
        self.fps = fps
        self.limit = limit
        self.sent: dict[int, float] = {}  # pts -> perf_counter() when handed to the encoder
        self._k = 0
        self._t0: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.limit is not None and self._k >= self.limit:
            self.stop()
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.perf_counter()
        due = self._t0 + self._k / self.fps
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = av.VideoFrame.from_ndarray(self.frames[self._k % len(self.frames)], format="rgb24")
        frame.pts = self._k * (CLOCK // int(round(self.fps)))
        frame.time_base = Fraction(1, CLOCK)
        self.sent[frame.pts] = time.perf_counter()
        self._k += 1
        return frame


@dataclass
class ClientResult:
    session: str | None = None
    messages: list[dict] = field(default_factory=list)
    replies: list[dict] = field(default_factory=list)  # pong, options, calibration, error
    latencies_ms: list[float] = field(default_factory=list)  # frame sent -> its message received
    unmatched: int = 0
    video_frames: int = 0
    video_sizes: set = field(default_factory=set)
    last_video: np.ndarray | None = None
    frames_sent: int = 0
    duration_s: float = 0.0

    def summary(self) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        faces = [m for m in self.messages if m.get("face")]
        engine = [m["timing_ms"]["engine"] for m in self.messages if "engine" in m.get("timing_ms", {})]
        return {
            "session": self.session, "frames_sent": self.frames_sent, "messages": len(self.messages),
            "faces": len(faces), "messages_per_s": round(len(self.messages) / max(self.duration_s, 1e-9), 2),
            "drop_fraction": round(1.0 - len(self.messages) / max(self.frames_sent, 1), 3),
            "latency_ms": {"p50": round(float(np.nanpercentile(lat, 50)), 1),
                           "p95": round(float(np.nanpercentile(lat, 95)), 1)},
            "engine_ms": None if not engine else {"p50": round(float(np.percentile(engine, 50)), 1),
                                                  "p95": round(float(np.percentile(engine, 95)), 1)},
            "video_frames": self.video_frames, "unmatched": self.unmatched,
        }


async def run_client(base_url: str, frames: list[np.ndarray], seconds: float, fps: float = 30.0,
                     receive_video: bool = True, options: dict | None = None, profile: dict | None = None,
                     on_open=None) -> ClientResult:
    """Stream `frames` for `seconds` to the server at base_url; returns what came back.
    `on_open(channel, result)` (a coroutine function) runs once the data channel is open."""
    result = ClientResult()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    camera = FileCameraTrack(frames, fps)
    channel = pc.createDataChannel("coefficients")
    opened = asyncio.Event()

    @channel.on("open")
    def _opened():
        opened.set()

    @channel.on("message")
    def on_message(text):
        now = time.perf_counter()
        msg = json.loads(text)
        if "type" in msg:
            result.replies.append(msg)
            return
        result.messages.append(msg)
        # RTP timestamps pass through a float conversion in aiortc: snap to the nearest frame slot
        step = CLOCK // int(round(camera.fps))
        sent = camera.sent.get(int(round(msg["pts"] / step)) * step) if msg.get("pts") is not None else None
        if sent is None:
            result.unmatched += 1
        else:
            result.latencies_ms.append((now - sent) * 1e3)

    video_task = None

    @pc.on("track")
    def on_track(track):
        nonlocal video_task
        if track.kind == "video":
            video_task = asyncio.ensure_future(_drain_video(track, result))

    if receive_video:
        pc.addTransceiver(camera, direction="sendrecv")
    else:
        pc.addTransceiver(camera, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp": pc.localDescription.sdp, "type": "offer"}
    if options:
        body["options"] = options
    if profile is not None:
        body["profile"] = profile
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/offer", json=body) as resp:
            answer = await resp.json()
            if resp.status != 200:
                await pc.close()
                raise RuntimeError(f"offer refused ({resp.status}): {answer.get('error')}")
    result.session = answer["session"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(opened.wait(), 15.0)
        if on_open is not None:
            await on_open(channel, result)
        await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
    finally:
        result.duration_s = time.perf_counter() - t0
        result.frames_sent = len(camera.sent)
        if video_task is not None:
            video_task.cancel()
        await pc.close()
    return result


async def _drain_video(track, result: ClientResult) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        result.video_frames += 1
        result.video_sizes.add((frame.width, frame.height))
        if result.video_frames % 10 == 1:
            result.last_video = frame.to_ndarray(format="rgb24")
