"""Live-server scenario, run inside a private network namespace (see tests/live/netns.py): a real server,
real aiortc clients streaming shared face videos over loopback WebRTC, real UDP receivers for VMC and
Live Link, a WebSocket subscriber, and the bad inputs a server meets. Prints one JSON object of what
happened; tests/test_live_server.py asserts on it."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection
from pythonosc.osc_bundle import OscBundle

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.assets import find_asset  # noqa: E402
from stream import livelink  # noqa: E402
from stream.client import FileCameraTrack, load_frames, run_client  # noqa: E402
from stream.loopback import restrict_ice_to_loopback  # noqa: E402
from stream.server import Server, ServerConfig  # noqa: E402
from stream.session import Limits  # noqa: E402


KILLED_CLIENT = """
import asyncio, sys
sys.path.insert(0, {repo!r})
import numpy as np
from stream.loopback import restrict_ice_to_loopback
from stream.client import run_client
restrict_ice_to_loopback()
async def opened(channel, result):
    await asyncio.sleep(1.0)
    print("streaming", result.session, len(result.messages), flush=True)
asyncio.run(run_client({base!r}, [np.full((240, 320, 3), 90, np.uint8)], 60.0, receive_video=False, on_open=opened))
"""


class Collector(asyncio.DatagramProtocol):
    def __init__(self, parse):
        self.parse = parse
        self.items, self.errors = [], []

    def datagram_received(self, data, addr):
        try:
            self.items.append(self.parse(data))
        except Exception as exc:
            self.errors.append(str(exc))


def parse_vmc(data: bytes) -> dict:
    bundle = OscBundle(data)
    msgs = [(m.address, list(m.params)) for m in bundle]
    return {"addresses": [a for a, _ in msgs],
            "blend": {p[0]: p[1] for a, p in msgs if a == "/VMC/Ext/Blend/Val"},
            "head": next((p for a, p in msgs if a == "/VMC/Ext/Bone/Pos"), None),
            "ok": next((p for a, p in msgs if a == "/VMC/Ext/OK"), None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def offer_sdp(codec_rename: dict | None = None, video: bool = True) -> str:
    """A real aiortc offer (optionally with its video codecs renamed, to offer ones the server lacks)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("coefficients")
    if video:
        pc.addTransceiver(FileCameraTrack([np.zeros((32, 32, 3), np.uint8)]), direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    for a, b in (codec_rename or {}).items():
        sdp = re.sub(rf"\b{a}/90000", f"{b}/90000", sdp)
    return sdp


async def post(http, url, **kw):
    async with http.post(url, **kw) as r:
        text = await r.text()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = {"raw": text}
        return r.status, body


async def main(out: Path) -> None:
    restrict_ice_to_loopback()
    loop = asyncio.get_running_loop()
    vmc_rx, ll_rx = Collector(parse_vmc), Collector(livelink.decode)
    vmc_port, ll_port, port = free_port(), free_port(), free_port()
    await loop.create_datagram_endpoint(lambda: vmc_rx, local_addr=("127.0.0.1", vmc_port))
    await loop.create_datagram_endpoint(lambda: ll_rx, local_addr=("127.0.0.1", ll_port))
    server = Server(ServerConfig(loopback_only=True, max_sessions=2, vmc=("127.0.0.1", vmc_port),
                                 livelink=("127.0.0.1", ll_port),
                                 limits=Limits(no_video_timeout_s=3.0, stall_timeout_s=2.0),
                                 batch_ms=2.0))  # the GPU path's cross-session batching, here on the CPU
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    res: dict = {"bad": {}}
    d3 = load_frames(str(find_asset("media/liveportrait_d3.mp4")), 60, (640, 480))
    d0 = load_frames(str(find_asset("media/liveportrait_d0.mp4")), 60, (480, 360))

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as r:
            res["health"] = await r.json()
        async with http.get(f"{base}/") as r:
            res["page"] = {"status": r.status, "has_start": "id=\"start\"" in await r.text()}

        # ---- bad offers: each a 400 with a message, none leaves a session behind
        res["bad"]["not_json"] = await post(http, f"{base}/offer", data=b"{nope")
        res["bad"]["missing_sdp"] = await post(http, f"{base}/offer", json={"type": "offer"})
        res["bad"]["garbage_sdp"] = await post(http, f"{base}/offer", json={"sdp": "hello", "type": "offer"})
        res["bad"]["broken_sdp"] = await post(http, f"{base}/offer",
                                              json={"sdp": "v=0\r\nm=video x\r\n", "type": "offer"})
        res["bad"]["no_video"] = await post(http, f"{base}/offer",
                                            json={"sdp": await offer_sdp(video=False), "type": "offer"})
        res["bad"]["codec"] = await post(http, f"{base}/offer", json={
            "sdp": await offer_sdp({"VP8": "AV1", "H264": "VP9"}), "type": "offer"})
        res["bad"]["options"] = await post(http, f"{base}/offer", json={
            "sdp": await offer_sdp(), "type": "offer", "options": {"style": "glitter"}})
        res["bad"]["foreign_target"] = await post(http, f"{base}/offer", json={
            "sdp": await offer_sdp(), "type": "offer", "options": {"vmc": "192.0.2.1:39539"}})
        res["sessions_after_bad"] = len(server.sessions)

        # ---- WebSocket subscriber for everything
        ws_msgs: list[dict] = []

        async def ws_reader():
            async with http.ws_connect(f"{base}/ws") as ws:
                async for m in ws:
                    ws_msgs.append(json.loads(m.data))

        ws_task = asyncio.create_task(ws_reader())
        await asyncio.sleep(0.2)

        # ---- two sessions at once; A also calibrates and changes options, B only streams
        during: dict = {}

        async def a_steps(channel, result):
            channel.send(json.dumps({"type": "ping", "t": 1}))
            channel.send(json.dumps({"type": "options", "style": "wireframe"}))
            channel.send(json.dumps({"type": "options", "style": "nonsense"}))
            channel.send("not json")
            await asyncio.sleep(1.0)
            channel.send(json.dumps({"type": "calibrate", "what": "neutral", "seconds": 2.0}))
            await asyncio.sleep(0.5)
            during["third"] = await post(http, f"{base}/offer", json={"sdp": await offer_sdp(), "type": "offer"})
            async with http.get(f"{base}/metrics") as r:
                during["metrics"] = await r.json()
            await asyncio.sleep(3.0)
            async with http.get(f"{base}/sessions/{result.session}/profile") as r:
                during["profile"] = (r.status, await r.json())
            async with http.put(f"{base}/sessions/{result.session}/profile", json={"format": "x"}) as r:
                during["bad_profile_put"] = (r.status, await r.json())
            async with http.get(f"{base}/metrics") as r:
                during["metrics_after_calibration"] = await r.json()
            during["identity"] = await post(http, f"{base}/sessions/{result.session}/calibrate/identity",
                                            json={"seconds": 10})
            during["unknown_calibration"] = await post(http, f"{base}/sessions/{result.session}/calibrate/teeth")
            during["no_session"] = await post(http, f"{base}/sessions/nope/calibrate/neutral")

        a, b = await asyncio.gather(
            run_client(base, d3, 7.0, receive_video=True, on_open=a_steps),  # runs on until a_steps ends
            run_client(base, d0, 7.0, receive_video=False))
        await asyncio.sleep(1.0)
        res["sessions_after_close"] = len(server.sessions)

        # ---- a client with frames too small to track, then one with odd sizes
        tiny = await run_client(base, [np.full((12, 12, 3), 128, np.uint8)], 2.0, receive_video=False)
        odd = await run_client(base, load_frames(str(find_asset("media/liveportrait_d3.mp4")), 30, (321, 239)),
                               3.0, receive_video=True)

        # ---- a client process that streams, then is killed (no goodbye): the stall watchdog ends it
        killed = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_CLIENT.format(repo=str(Path(__file__).resolve().parents[2]), base=base),
            stdout=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(killed.stdout.readline(), 60)
        res["killed"] = {"client_said": line.decode().strip(), "sessions_while_streaming": len(server.sessions)}
        killed.kill()
        await killed.wait()
        await asyncio.sleep(3.5)
        res["killed"]["sessions_after"] = len(server.sessions)

        # ---- a client that posts an offer and vanishes before connecting
        status, body = await post(http, f"{base}/offer", json={"sdp": await offer_sdp(), "type": "offer"})
        res["vanish"] = {"status": status, "sessions_right_after": len(server.sessions)}
        await asyncio.sleep(4.0)
        res["vanish"]["sessions_after_timeout"] = len(server.sessions)
        async with http.get(f"{base}/health") as r:
            res["health_end"] = await r.json()
        ws_task.cancel()

    def client(r, with_messages=True):
        d = r.summary()
        d["sessions_seen"] = sorted({m["session"] for m in r.messages})
        d["replies"] = r.replies
        d["video_sizes"] = sorted(r.video_sizes)
        if with_messages:
            d["messages_sample"] = r.messages[-3:]
        d["face_messages"] = sum(1 for m in r.messages if m.get("face"))
        d["last_blendshapes"] = next((m["blendshapes"] for m in reversed(r.messages) if m.get("face")), None)
        return d

    res.update(a=client(a), b=client(b), tiny=client(tiny, False), odd=client(odd, False), during=during)
    res["ws"] = {"messages": len(ws_msgs), "sessions": sorted({m["session"] for m in ws_msgs})}
    res["vmc"] = {"packets": len(vmc_rx.items), "errors": vmc_rx.errors[:3],
                  "sample": next((p for p in reversed(vmc_rx.items) if p["blend"]), None)}
    res["livelink"] = {"packets": len(ll_rx.items), "errors": ll_rx.errors[:3],
                       "faces": sum(1 for p in ll_rx.items if p["face"]),
                       "sample": next((p for p in reversed(ll_rx.items) if p["face"]), None)}
    await runner.cleanup()
    out.write_text(json.dumps(res, default=str))


if __name__ == "__main__":
    t0 = time.time()
    asyncio.run(main(Path(sys.argv[1])))
    print(f"scenario finished in {time.time() - t0:.1f} s")
