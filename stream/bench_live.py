"""`facestream bench-live`: N concurrent WebRTC sessions over loopback, each streaming a shared face video
at 30 fps to a real server process (`run_server.py`), measured from the client side (frame handed to the
encoder -> its coefficient message received) and from the server's /metrics (engine and render times,
drops). `--floor` measures aiortc's transport alone: a server that answers each frame with a tiny message
and does no tracking or rendering.

Runs itself inside a fresh network namespace with only `lo` up (`unshare --net`), with ICE restricted to
127.0.0.1 and no STUN, so nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
NETNS_ENV = "FACESTREAM_IN_NETNS"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="facestream bench-live", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="streaming time per run")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--video", help="face video (default: liveportrait_d3.mp4 from the assets' media)")
    p.add_argument("--size", default="640x480")
    p.add_argument("--no-render", action="store_true", help="server returns no video (tracking only)")
    p.add_argument("--floor", action="store_true", help="transport only: no tracking, no rendering")
    p.add_argument("--server-args", default="", help="extra run_server.py arguments, e.g. '--no-prdl'")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-netns", action="store_true", help="do not enter a private network namespace")
    p.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        asyncio.run(_echo_server(args.echo_server))
        return 0
    if not args.no_netns and os.environ.get(NETNS_ENV) != "1":
        return _reexec_in_netns(sys.argv[1:] if argv is None else argv)
    from stream.loopback import restrict_ice_to_loopback

    restrict_ice_to_loopback()
    result = asyncio.run(_bench(args))
    _print(result, args.json)
    return 0


def _reexec_in_netns(argv) -> int:
    if shutil.which("unshare") is None:
        print("facestream bench-live: error: `unshare` (util-linux) is needed to isolate the network; "
              "pass --no-netns to run on the host's loopback", file=sys.stderr)
        return 2
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    inner = f"ip link set lo up && exec {sys.executable} -m stream.bench_live " + " ".join(
        _quote(a) for a in argv)
    env = {**os.environ, NETNS_ENV: "1"}
    return subprocess.call(["unshare", "--net", *user, "sh", "-c", inner], env=env, cwd=REPO)


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_video() -> str:
    from engine.assets import find_asset

    return str(find_asset("media/liveportrait_d3.mp4"))


async def _start_server(args, port: int) -> subprocess.Popen:
    if args.floor:
        cmd = [sys.executable, "-m", "stream.bench_live", "--echo-server", str(port)]
    else:
        cmd = [sys.executable, str(REPO / "run_server.py"), "--loopback-only", "--port", str(port),
               "--max-sessions", str(max(args.sessions, 1)), "--log-level", "warning"]
        if args.no_render:
            cmd.append("--no-render")
        cmd += args.server_args.split()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, proc.stdout.readline)
        if "serving on" in line:
            break
        if proc.poll() is not None or time.monotonic() - t0 > 180:
            proc.kill()
            raise RuntimeError(f"server did not start: {line.strip() or proc.stdout.read()[-2000:]}")
    asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)  # keep the pipe drained
    return proc


async def _bench(args) -> dict:
    import aiohttp

    from stream.client import load_frames, run_client

    w, h = (int(v) for v in args.size.lower().split("x"))
    video = args.video or _default_video()
    frames = load_frames(video, 150, (w, h))
    port = _free_port()
    server = await _start_server(args, port)
    base = f"http://127.0.0.1:{port}"
    snapshots: dict[str, dict] = {}
    health = None

    async def poll_metrics():
        nonlocal health
        async with aiohttp.ClientSession() as http:
            if not args.floor:
                async with http.get(f"{base}/health") as r:
                    health = await r.json()
            while True:
                if not args.floor:
                    async with http.get(f"{base}/metrics") as r:
                        for s in (await r.json())["sessions"]:
                            snapshots[s["session"]] = s
                await asyncio.sleep(1.0)

    poller = asyncio.create_task(poll_metrics())
    try:
        results = await asyncio.gather(*(run_client(base, frames, args.seconds, args.fps,
                                                    receive_video=not (args.no_render or args.floor))
                                          for _ in range(args.sessions)))
    finally:
        poller.cancel()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    per_session = []
    for r in results:
        s = r.summary()
        m = snapshots.get(r.session, {})
        s["server_dropped"] = m.get("frames_dropped")
        s["server_engine_ms"] = m.get("engine_ms")
        s["server_render_ms"] = m.get("render_ms")
        s["stages_ms"] = {k: v["p50"] for k, v in (m.get("stages_ms") or {}).items() if v}
        per_session.append(s)
    lat = np.concatenate([np.array(r.latencies_ms) for r in results if r.latencies_ms] or [np.array([np.nan])])
    return {
        "mode": "floor" if args.floor else ("no-render" if args.no_render else "render"),
        "sessions": args.sessions, "seconds": args.seconds, "fps": args.fps, "size": args.size,
        "video": Path(video).name, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "backend": None if health is None else health.get("backend"),
        "renderer": None if health is None else health.get("renderer"),
        "latency_ms": {"p50": round(float(np.nanpercentile(lat, 50)), 1),
                       "p95": round(float(np.nanpercentile(lat, 95)), 1)},
        "per_session": per_session,
    }


def _print(res: dict, as_json: bool) -> None:
    print(f"bench-live: mode {res['mode']}, {res['sessions']} session(s) x {res['seconds']:.0f} s at "
          f"{res['fps']:.0f} fps, {res['size']} ({res['video']}), backend {res['backend']}, renderer {res['renderer']}")
    for i, s in enumerate(res["per_session"]):
        eng = s["server_engine_ms"] or s["engine_ms"] or {}
        ren = s["server_render_ms"] or {}
        print(f"  session {i}: {s['messages_per_s']:.1f} msg/s, sent {s['frames_sent']}, messages {s['messages']} "
              f"(face {s['faces']}), server drops {s['server_dropped']}, "
              f"frame sent->message p50 {s['latency_ms']['p50']} / p95 {s['latency_ms']['p95']} ms, "
              f"engine p50 {eng.get('p50')} / p95 {eng.get('p95')} ms, render p50 {ren.get('p50')} / p95 "
              f"{ren.get('p95')} ms, returned video frames {s['video_frames']}")
        if s["stages_ms"]:
            print("    stage p50 ms: " + ", ".join(f"{k} {v}" for k, v in s["stages_ms"].items()))
    print(f"  all sessions: frame sent->message p50 {res['latency_ms']['p50']} / p95 {res['latency_ms']['p95']} ms")
    if as_json:
        print(json.dumps(res))


# ---------------------------------------------------------------- transport floor
async def _echo_server(port: int) -> None:
    """Answers every received frame at once with {"pts"} on the data channel: aiortc's own cost."""
    from aiohttp import web
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from stream.loopback import restrict_ice_to_loopback

    restrict_ice_to_loopback()
    pcs = set()

    async def offer(request):
        body = await request.json()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.add(pc)
        channel = {}

        @pc.on("datachannel")
        def on_dc(ch):
            channel["c"] = ch

        @pc.on("track")
        def on_track(track):
            async def pump():
                while True:
                    try:
                        frame = await track.recv()
                    except MediaStreamError:
                        return
                    ch = channel.get("c")
                    if ch is not None and ch.readyState == "open":
                        ch.send(json.dumps({"v": 1, "pts": frame.pts, "face": False}))
            asyncio.ensure_future(pump())

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": f"echo-{len(pcs)}"})

    app = web.Application()
    app.router.add_post("/offer", offer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"facestream: serving on http://127.0.0.1:{port}/ (transport floor)", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
