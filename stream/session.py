"""One live WebRTC session: newest-frame-wins ingest, tracking, coefficient outputs and the rendered video.

Three tasks per session, joined only by one-slot mailboxes so no stage ever queues stale frames:

    read  (track.recv)   -> frame slot  -> track (engine thread) -> message out -> render slot
    render (render process, stream/render_worker.py) -> rendered-video track (one slot; the encoder takes the newest)

A frame that arrives while the previous one is still being tracked replaces it in the slot and counts as
dropped. An error in one frame is reported to this session and tracking goes on with the next.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from fractions import Fraction

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from engine.messages import build_message
from engine.render import STYLES
from stream.calibrate import CAPTURES, capture_done, detach_profile, finish_capture, reattach_profile, start_identity
from stream.metrics import Rate, Samples, StageTimes

log = logging.getLogger("facestream.session")

DATA_CHANNEL_MAX_BUFFER = 1 << 20  # bytes; a client that stops reading loses messages, not memory


@dataclass
class Limits:
    max_width: int = 1280  # larger frames are scaled down before tracking
    max_height: int = 720
    max_fps: float = 30.0  # frames beyond this rate are dropped before tracking
    no_video_timeout_s: float = 30.0  # a session that never delivers a frame is closed
    stall_timeout_s: float = 10.0  # ... and one whose video stops (a client that vanished without a goodbye)


@dataclass
class SessionOptions:
    style: str = "shaded"  # overlay: shaded, wireframe or parts
    avatar: bool = True  # avatar inset in the returned video
    landmarks68: bool = False  # add the 68 fitted points to each message

    def update(self, d: dict) -> None:
        """Apply the known keys of d; raise ValueError naming a bad value."""
        if "style" in d:
            if d["style"] not in STYLES:
                raise ValueError(f"style must be one of {', '.join(STYLES)}, got {d['style']!r}")
            self.style = d["style"]
        for key in ("avatar", "landmarks68"):
            if key in d:
                if not isinstance(d[key], bool):
                    raise ValueError(f"{key} must be true or false, got {d[key]!r}")
                setattr(self, key, d[key])


class RenderedTrack(MediaStreamTrack):
    """The overlay video sent back to the client: always the newest rendered frame."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self._slot: asyncio.Queue[av.VideoFrame] = asyncio.Queue(1)

    def put(self, frame: av.VideoFrame) -> None:
        if self._slot.full():
            self._slot.get_nowait()
        self._slot.put_nowait(frame)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        return await self._slot.get()


@dataclass
class Capture:
    """A calibration capture in progress: raw (uncalibrated) states for `seconds` of video."""

    what: str
    seconds: float
    future: asyncio.Future
    profile: object = None  # the session's profile, detached while capturing; the result goes into it
    started: float = field(default_factory=time.monotonic)
    started_ms: float = field(default_factory=lambda: time.time() * 1000.0)
    states: list = field(default_factory=list)


class Session:
    def __init__(self, pc, tracker, engine_pool: Executor, render, outputs, options: SessionOptions,
                 limits: Limits, hub, on_close):
        self.id = uuid.uuid4().hex[:12]
        self.pc = pc
        self.tracker = tracker
        self.engine_pool = engine_pool
        self.render = render  # async callable (rgb, state, camera, style, avatar) -> rgb, or None
        self.outputs = outputs  # senders with .send(msg) (VMC, Live Link)
        self.options = options
        self.limits = limits
        self.hub = hub
        self._on_close = on_close
        self.channel = None
        self.video_out: RenderedTrack | None = None
        self.created = time.monotonic()
        self.closed = False
        self.last_error: str | None = None
        self.capture: Capture | None = None
        # figures for /metrics
        self.received = self.processed = self.dropped = self.rate_limited = self.errors = 0
        self.messages_dropped = 0
        self.frame_size: tuple[int, int] | None = None
        self.fps = Rate()
        self.engine_ms = Samples()
        self.render_ms = Samples()
        self.stages = StageTimes()
        self._frame_slot: tuple | None = None
        self._frame_ready = asyncio.Event()
        self._render_slot: tuple | None = None
        self._render_ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._starts: deque[float] = deque()  # processing starts in the last second (rate limit)
        self._last_frame_at = time.perf_counter()

    # ------------------------------------------------------------------ wiring
    def attach_video(self, track) -> None:
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._read(track)), loop.create_task(self._track_loop())]
        if self.video_out is not None and self.render is not None:
            self._tasks.append(loop.create_task(self._render_loop()))

    def attach_channel(self, channel) -> None:
        self.channel = channel

        @channel.on("message")
        def on_message(text):
            asyncio.ensure_future(self._on_command(text))

    def start_watchdog(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._watchdog()))

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        log.info("session %s closed: %s", self.id, reason)
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        if self.capture is not None and not self.capture.future.done():
            self.capture.future.set_exception(RuntimeError(f"session closed during calibration ({reason})"))
        for out in self.outputs:
            out.close()
        if self.video_out is not None:
            self.video_out.stop()
        try:
            await self.pc.close()
        finally:
            self._on_close(self)

    # ------------------------------------------------------------------ frames
    async def _read(self, track) -> None:
        """Take every decoded frame as it comes; keep only the newest for the tracker."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                await self.close("the client's video track ended")
                return
            self.received += 1
            self._last_frame_at = time.perf_counter()
            if self._frame_slot is not None:
                self.dropped += 1  # the tracker is still busy with an older frame
            self._frame_slot = (frame, time.time() * 1000.0, time.perf_counter())
            self._frame_ready.set()

    async def _track_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            frame, ts_recv, t_recv = self._frame_slot
            self._frame_slot = None
            if self._over_rate():
                self.rate_limited += 1
                continue
            index = self.processed + self.errors
            try:
                rgb, state = await loop.run_in_executor(self.engine_pool, self._track_frame, frame, index, ts_recv,
                                                        t_recv)
            except Exception as exc:  # one bad frame: tell this client, keep the session
                self.errors += 1
                self.last_error = f"frame {index}: {exc}"
                log.warning("session %s: %s", self.id, self.last_error)
                self._send({"v": 1, "session": self.id, "type": "error", "error": self.last_error})
                continue
            msg = build_message(state, self.id, include_landmarks68=self.options.landmarks68)
            engine = (time.perf_counter() - t_recv) * 1e3
            msg["timing_ms"]["engine"] = round(engine, 3)
            self._send(msg)
            self.processed += 1
            self.fps.tick()
            self.engine_ms.add(engine)
            self.stages.add(msg["timing_ms"])
            if self.capture is not None:
                self._capture_step(state)
            if self.video_out is not None and self.render is not None:
                self._render_slot = (rgb, state, frame.pts, frame.time_base)
                self._render_ready.set()

    def _over_rate(self) -> bool:
        """At most max_fps frames in any one-second window: network jitter may bunch frames of a 30 fps
        camera, which a minimum-interval rule would wrongly drop."""
        if not self.limits.max_fps:
            return False
        now = time.monotonic()
        starts = self._starts
        while starts and starts[0] <= now - 1.0:
            starts.popleft()
        if len(starts) >= self.limits.max_fps:
            return True
        starts.append(now)
        return False

    def _track_frame(self, frame: av.VideoFrame, index: int, ts_recv: float, t_recv: float):
        """In an engine thread: convert (and scale down to the session limit), then track."""
        t0 = time.perf_counter()
        waited = (t0 - t_recv) * 1e3  # received -> picked up (the tracker was busy, or thread hand-off)
        w, h = frame.width, frame.height
        scale = min(1.0, self.limits.max_width / w, self.limits.max_height / h)
        if scale < 1.0:
            w, h = max(16, int(w * scale) // 2 * 2), max(16, int(h * scale) // 2 * 2)
            frame = frame.reformat(width=w, height=h)
        rgb = frame.to_ndarray(format="rgb24")
        self.frame_size = (rgb.shape[1], rgb.shape[0])
        convert = (time.perf_counter() - t0) * 1e3
        tb = frame.time_base or Fraction(1, 90000)
        pts = frame.pts
        t_seconds = float(pts * tb) if pts is not None else None
        state = self.tracker.process(rgb, index, pts=pts, ts_capture=ts_recv, t_seconds=t_seconds)
        state.time_base = f"{tb.numerator}/{tb.denominator}"
        state.timings_ms["convert"] = convert
        state.timings_ms["wait"] = waited
        return rgb, state

    async def _render_loop(self) -> None:
        while True:
            await self._render_ready.wait()
            self._render_ready.clear()
            rgb, state, pts, time_base = self._render_slot
            self._render_slot = None
            t0 = time.perf_counter()
            try:
                camera = self.tracker.camera_for(rgb.shape[1], rgb.shape[0])
                out = await self.render(rgb, state, camera, self.options.style, self.options.avatar)
            except Exception as exc:
                self.errors += 1
                self.last_error = f"render: {exc}"
                log.warning("session %s: %s", self.id, self.last_error)
                continue
            self.render_ms.add((time.perf_counter() - t0) * 1e3)
            vf = av.VideoFrame.from_ndarray(out, format="rgb24")
            vf.pts, vf.time_base = pts, time_base
            self.video_out.put(vf)

    # ------------------------------------------------------------------ outputs
    def _send(self, msg: dict) -> None:
        text = json.dumps(msg, separators=(",", ":"))
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            if ch.bufferedAmount > DATA_CHANNEL_MAX_BUFFER:
                self.messages_dropped += 1
            else:
                ch.send(text)
        self.hub.publish(self.id, text)
        for out in self.outputs:
            out.send(msg)

    # ------------------------------------------------------------------ commands from the page
    async def _on_command(self, text) -> None:
        try:
            cmd = json.loads(text)
            if not isinstance(cmd, dict):
                raise ValueError("a command is a JSON object")
            kind = cmd.get("type")
            if kind == "ping":
                self._reply({"type": "pong", "t": cmd.get("t"), "server_ms": time.time() * 1000.0})
            elif kind == "options":
                self.options.update(cmd)
                self._reply({"type": "options", **self.describe_options()})
            elif kind == "calibrate":
                result = await self.calibrate(str(cmd.get("what")), float(cmd.get("seconds", 2.0)))
                self._reply({"type": "calibration", "what": cmd.get("what"), "result": result})
            else:
                raise ValueError(f"unknown command type {kind!r} (ping, options, calibrate)")
        except Exception as exc:
            self._reply({"type": "error", "error": str(exc)})

    def _reply(self, obj: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(json.dumps({"v": 1, "session": self.id, **obj}))

    def describe_options(self) -> dict:
        return {"style": self.options.style, "avatar": self.options.avatar, "landmarks68": self.options.landmarks68}

    # ------------------------------------------------------------------ calibration
    async def calibrate(self, what: str, seconds: float = 2.0) -> dict:
        """Capture `seconds` of this session's video and fold the result into its profile (neutral: the
        resting face; ranges: the user's full expressions; identity: a new multi-frame identity estimate,
        `seconds` being its time limit). Returns what was stored."""
        if what not in CAPTURES:
            raise ValueError(f"unknown calibration {what!r}; choose one of {', '.join(CAPTURES)}")
        if not 0.5 <= seconds <= 30.0:
            raise ValueError("calibration capture must last 0.5 to 30 seconds")
        if what == "identity":
            seconds = max(seconds, 10.0)  # a limit: it ends when enough near-frontal frames were seen
        if self.capture is not None:
            raise RuntimeError(f"a {self.capture.what} calibration is already running")
        fut = asyncio.get_running_loop().create_future()
        self.capture = Capture(what, seconds, fut, profile=detach_profile(self.tracker))  # raw values needed
        if what == "identity":
            start_identity(self.tracker)
        try:
            return await asyncio.wait_for(fut, seconds + 15.0)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{what} calibration did not finish in {seconds + 15.0:g} s "
                               "(too few frames with a face, or not near-frontal)") from None
        finally:
            reattach_profile(self.tracker, self.capture.profile)
            self.capture = None

    def _capture_step(self, state) -> None:
        cap = self.capture
        if state.ts_capture >= cap.started_ms:  # frames tracked before the profile was detached are skipped
            cap.states.append(state)
        if capture_done(self, cap, time.monotonic() - cap.started) and not cap.future.done():
            try:
                cap.future.set_result(finish_capture(self, cap))
            except Exception as exc:
                cap.future.set_exception(exc)

    # ------------------------------------------------------------------ watchdog and metrics
    async def _watchdog(self) -> None:
        """Close sessions whose client never sent video, or stopped sending it without closing (a killed
        browser tab, a dropped network): ICE consent checks would notice only after ~30 s."""
        while not self.closed:
            await asyncio.sleep(0.5)
            if self.received == 0:
                if time.monotonic() - self.created >= self.limits.no_video_timeout_s:
                    await self.close(f"no video received within {self.limits.no_video_timeout_s:g} s")
            elif time.perf_counter() - self._last_frame_at >= self.limits.stall_timeout_s:
                await self.close(f"no video for {self.limits.stall_timeout_s:g} s: the client is gone")

    def metrics(self) -> dict:
        return {
            "session": self.id, "age_s": round(time.monotonic() - self.created, 1),
            "connection": self.pc.connectionState, "frame_size": self.frame_size,
            "frames_received": self.received, "frames_processed": self.processed,
            "frames_dropped": self.dropped, "frames_rate_limited": self.rate_limited,
            "errors": self.errors, "last_error": self.last_error, "messages_dropped": self.messages_dropped,
            "fps": round(self.fps.per_second(), 2),
            "engine_ms": self.engine_ms.summary(), "render_ms": self.render_ms.summary(),
            "stages_ms": self.stages.summary(), "options": self.describe_options(),
            "calibrated": self.describe_calibration(),
        }

    def describe_calibration(self) -> dict:
        p = self.tracker.profile
        return {"neutral": p is not None and p.neutral is not None, "ranges": p is not None and p.ranges is not None,
                "identity": p is not None and p.identity is not None}

