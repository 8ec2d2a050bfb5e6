"""The live server: aiohttp + aiortc. Routes (see DESIGN.md and docs/OUTPUTS.md):

  GET  /                         the page (stream/static)
  POST /offer                    {"sdp", "type": "offer", "options"?, "profile"?} -> {"sdp", "type", "session"}
  GET  /health, GET /metrics     status, backend, sessions; per-session fps, drops, latencies
  GET  /ws[?session=ID]          WebSocket: the coefficient messages of every (or one) session
  POST /sessions/ID/options      {"style", "avatar", "landmarks68"}
  POST /sessions/ID/calibrate/W  W = neutral | ranges, body {"seconds"}; returns the stored values
  GET  /sessions/ID/profile      the session's calibration profile (JSON)
  PUT  /sessions/ID/profile      load a profile into the running session
  DELETE /sessions/ID            end a session

The networks are loaded once (one Pack); every session has its own tracker. Tracking runs in a thread
pool, rendering in a separate process (stream/render_worker.py); the event loop only moves frames and messages.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from stream.calibrate import apply_profile
from stream.hub import MessageHub
from stream.livelink import LiveLinkSender
from stream.loopback import ice_restricted_to_loopback, restrict_ice_to_loopback
from stream.render_worker import RenderProcess
from stream.sdp import SdpError, check_offer
from stream.session import Limits, RenderedTrack, Session, SessionOptions
from stream.vmc import VmcSender

log = logging.getLogger("facestream.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    loopback_only: bool = False
    backend: str = "auto"
    vmc: tuple[str, int] | None = None  # every session's messages also go here
    livelink: tuple[str, int] | None = None
    livelink_subject: str = "facestream"
    profile: str | None = None  # profile file loaded into every new session
    render: bool = True  # return the rendered video when the client asks for it
    limits: Limits = field(default_factory=Limits)
    prdl: bool | None = None  # None: the tracker's default
    # torch intra-op threads per network call: one, because the server runs decoding, encoding, rendering and
    # other sessions beside it (bench-live, 2 cores: engine p95 58 -> 20 ms, frame -> message p95 106 -> 72 ms)
    threads: int = 1
    batch_ms: float | None = None  # batch the networks across sessions, collecting this long; None: on GPU only


def parse_target(text: str, default_port: int) -> tuple[str, int]:
    """'HOST:PORT', 'HOST' or ':PORT' -> (host, port)."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    host = host or "127.0.0.1"
    try:
        p = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad target {text!r}: the port must be a number") from None
    if not 0 < p < 65536:
        raise ValueError(f"bad target {text!r}: port out of range")
    return host, p


class Server:
    def __init__(self, config: ServerConfig, pack=None):
        from engine.pack import Pack

        self.config = config
        if config.loopback_only:
            restrict_ice_to_loopback()
        self.pack = pack or Pack(config.backend, threads=config.threads)
        self.render = RenderProcess() if config.render else None
        self.scheduler = self._scheduler(config.batch_ms)
        self.engine_pool = ThreadPoolExecutor(max(2, config.max_sessions), thread_name_prefix="engine")
        self.sessions: dict[str, Session] = {}
        self.hub = MessageHub()
        self.started = time.monotonic()
        self.refused = 0
        self.default_profile = None
        if config.profile:
            from calibration.profile import Profile

            self.default_profile = Profile.load(config.profile)  # ProfileError: the caller reports it

    def _scheduler(self, batch_ms: float | None):
        """On a GPU, the detector and landmark network run once per batch of all sessions' frames
        (engine/batching.py); on a CPU batching buys nothing, so each session calls them directly."""
        if batch_ms is None:
            batch_ms = 2.0 if self.pack.backend.device.type == "cuda" else 0.0
        if batch_ms <= 0:
            return None
        from engine.batching import BatchScheduler

        scheduler = BatchScheduler(self.pack, max_wait_ms=batch_ms)
        scheduler.warm()
        return scheduler

    def _new_tracker(self):
        cfg = self._tracker_config()
        if self.scheduler is not None:
            return self.scheduler.session(cfg).tracker
        return self.pack.tracker(cfg)

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/ws", self.websocket)
        app.router.add_post("/sessions/{id}/options", self.set_options)
        app.router.add_post("/sessions/{id}/calibrate/{what}", self.calibrate)
        app.router.add_get("/sessions/{id}/profile", self.get_profile)
        app.router.add_put("/sessions/{id}/profile", self.put_profile)
        app.router.add_delete("/sessions/{id}", self.end_session)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app) -> None:
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())))
        self.engine_pool.shutdown(wait=False)
        if self.scheduler is not None:
            self.scheduler.close()
        if self.render is not None:
            self.render.close()

    # ------------------------------------------------------------------ pages
    async def index(self, request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def health(self, request) -> web.Response:
        return web.json_response({
            "status": "ok", **self.pack.describe(),
            "renderer": self.render.gl_renderer if self.render else None,
            "sessions": len(self.sessions), "max_sessions": self.config.max_sessions,
            "loopback_only": ice_restricted_to_loopback(), "uptime_s": round(time.monotonic() - self.started, 1),
            "batching": None if self.scheduler is None else self.scheduler.stats(),
        })

    async def metrics(self, request) -> web.Response:
        sessions = [s.metrics() for s in self.sessions.values()]
        return web.json_response({
            "sessions": sessions, "refused": self.refused,
            "totals": {"fps": round(sum(s["fps"] for s in sessions), 2),
                       "frames_processed": sum(s["frames_processed"] for s in sessions),
                       "frames_dropped": sum(s["frames_dropped"] for s in sessions)},
        })

    # ------------------------------------------------------------------ WebRTC
    async def offer(self, request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}")
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            return _error(400, "expected JSON {\"sdp\": <offer SDP string>, \"type\": \"offer\"}")
        if len(self.sessions) >= self.config.max_sessions:
            self.refused += 1
            return _error(503, f"server full: {len(self.sessions)} sessions running (--max-sessions "
                               f"{self.config.max_sessions}); try again later")
        try:
            offer = check_offer(body["sdp"])
            options = SessionOptions()
            options.update(body.get("options") or {})
            profile = self._profile_from(body.get("profile"))
            outputs = self._outputs(body.get("options") or {}, request.remote)
        except (SdpError, ValueError) as exc:
            return _error(400, str(exc))

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN/TURN: host candidates only
        tracker = self._new_tracker()
        session = Session(pc, tracker, self.engine_pool, self.render, outputs, options, self.config.limits,
                          self.hub, on_close=self._forget)
        if profile is not None:
            apply_profile(tracker, profile)
        self.sessions[session.id] = session

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label == "coefficients":
                session.attach_channel(channel)

        @pc.on("track")
        def on_track(track):
            if track.kind == "video":
                session.attach_video(track)

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await session.close(f"connection {pc.connectionState}")

        if offer.wants_video_back and self.render is not None:
            session.video_out = RenderedTrack()  # before on_track fires, so its render loop starts
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
            if session.video_out is not None:
                pc.addTrack(session.video_out)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as exc:  # aiortc rejects what it cannot negotiate with ValueError and friends
            await session.close("negotiation failed")
            return _error(400, f"could not negotiate the offer: {exc}")
        session.start_watchdog()
        log.info("session %s started (%d running)", session.id, len(self.sessions))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": session.id, "options": session.describe_options()})

    def _tracker_config(self):
        from engine.tracker import TrackerConfig

        cfg = TrackerConfig()
        if self.config.prdl is not None:
            cfg.prdl = self.config.prdl
        return cfg

    def _profile_from(self, obj):
        from calibration.profile import Profile, ProfileError

        if obj is None:
            return self.default_profile
        try:
            return Profile.from_dict(obj)
        except ProfileError as exc:
            raise ValueError(f"profile: {exc}") from None

    def _outputs(self, options: dict, remote: str | None) -> list:
        """The server-wide VMC / Live Link targets, plus any the session asks for (only to its own host
        or loopback, so a page cannot aim the server's UDP at third parties)."""
        outs = []
        vmc, livelink = self.config.vmc, self.config.livelink
        if options.get("vmc"):
            vmc = self._session_target(options["vmc"], 39539, remote)
        if options.get("livelink"):
            livelink = self._session_target(options["livelink"], 11111, remote)
        if vmc:
            outs.append(VmcSender(*vmc))
        if livelink:
            outs.append(LiveLinkSender(*livelink, subject=self.config.livelink_subject))
        return outs

    @staticmethod
    def _session_target(text, default_port: int, remote: str | None) -> tuple[str, int]:
        host, port = parse_target(str(text), default_port)
        if host not in ("127.0.0.1", "localhost", "::1", remote):
            raise ValueError(f"a session may send to its own host or loopback only, not {host}")
        return ("127.0.0.1" if host == "localhost" else host), port

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    # ------------------------------------------------------------------ WebSocket
    async def websocket(self, request) -> web.WebSocketResponse:
        wanted = request.query.get("session")
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        sub = self.hub.subscribe(wanted)

        async def pump():
            while True:
                await ws.send_str(await sub.queue.get())

        pumper = asyncio.create_task(pump())
        try:
            async for m in ws:  # apps only listen; the loop ends when they close
                if m.type == WSMsgType.ERROR:
                    break
        finally:
            pumper.cancel()
            self.hub.unsubscribe(sub)
        return ws

    # ------------------------------------------------------------------ per-session HTTP
    def _session(self, request) -> Session:
        s = self.sessions.get(request.match_info["id"])
        if s is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"no session {request.match_info['id']!r}"}),
                                   content_type="application/json")
        return s

    async def set_options(self, request) -> web.Response:
        s = self._session(request)
        try:
            s.options.update(await request.json())
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        return web.json_response(s.describe_options())

    async def calibrate(self, request) -> web.Response:
        s = self._session(request)
        try:
            body = await request.json() if request.can_read_body else {}
            result = await s.calibrate(request.match_info["what"], float(body.get("seconds", 2.0)))
        except (ValueError, RuntimeError, asyncio.TimeoutError) as exc:
            return _error(400, str(exc) or "calibration timed out: no frames arrived")
        return web.json_response({"session": s.id, "what": request.match_info["what"], "result": result})

    async def get_profile(self, request) -> web.Response:
        s = self._session(request)
        p = s.tracker.profile
        if p is None:
            return _error(404, "this session has no calibration yet")
        return web.json_response(p.to_dict())

    async def put_profile(self, request) -> web.Response:
        from calibration.profile import Profile, ProfileError

        s = self._session(request)
        try:
            profile = Profile.from_dict(await request.json())
        except (ValueError, ProfileError) as exc:
            return _error(400, f"profile not loaded, the session goes on as before: {exc}")
        apply_profile(s.tracker, profile)
        return web.json_response({"session": s.id, "loaded": profile.name, **s.describe_calibration()})

    async def end_session(self, request) -> web.Response:
        s = self._session(request)
        await s.close("ended by request")
        return web.json_response({"session": s.id, "closed": True})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def serve(config: ServerConfig) -> None:
    """Run until cancelled."""
    server = Server(config)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("facestream live on http://%s:%d/ (%s)", config.host, config.port, server.pack.describe())
    print(f"facestream: serving on http://{config.host}:{config.port}/  backend {server.pack.describe()['backend']}"
          f"  renderer {server.render.gl_renderer if server.render else 'off'}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
