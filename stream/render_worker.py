"""The renderer in its own process. moderngl holds the GIL while Mesa's llvmpipe rasterises, which in a
thread stalled the tracker's Python for the whole draw (landmarks 10 -> 30-40 ms per frame in bench-live);
in a process, tracking and rendering run on separate cores. Requests go over a pipe, one at a time."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
from concurrent.futures import ThreadPoolExecutor

_READY = "ready"
RENDER_NICENESS = 10


def _serve(conn) -> None:
    """Worker process: load the face model, open the GL context, render requests until the pipe closes.
    It runs at a lower CPU priority: when cores are short, the returned video skips frames (the newest
    tracked frame is always the one rendered) while tracking keeps its rate."""
    import os

    os.nice(RENDER_NICENESS)
    from engine.face_model import FaceModel
    from engine.render import Renderer

    try:
        renderer = Renderer(FaceModel.load())
    except Exception as exc:  # RenderError or a missing asset: report it to the parent, then stop
        conn.send(("error", f"{exc.__class__.__name__}: {exc}"))
        return
    from engine import freeze_long_lived

    freeze_long_lived()  # no full-collection stalls of the returned video
    conn.send((_READY, renderer.gl_renderer))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        try:
            conn.send(("ok", renderer.render(*request)))
        except Exception as exc:
            conn.send(("error", f"{exc.__class__.__name__}: {exc}"))
    renderer.release()


class RenderProcess:
    """Async front of the render worker: `await service(rgb, state, camera, style, avatar)` -> rgb."""

    def __init__(self, start_timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited GL or torch thread state
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), name="facestream-render", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.process.kill()
            raise RuntimeError(f"the render process did not start within {start_timeout_s:g} s")
        kind, detail = self._conn.recv()
        if kind != _READY:
            self.process.join(5)
            from engine.render import RenderError

            raise RenderError(f"render process: {detail}")
        self.gl_renderer = detail
        self._lock = threading.Lock()  # one request in flight on the pipe
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="render-pipe")

    def _roundtrip(self, request):
        with self._lock:
            self._conn.send(request)
            kind, payload = self._conn.recv()
        if kind != "ok":
            raise RuntimeError(payload)
        return payload

    async def __call__(self, rgb, state, camera, style, avatar):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._roundtrip, (rgb, state, camera, style, avatar))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
