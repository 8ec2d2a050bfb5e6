"""Example receivers for the server's outputs, to check a setup or start an integration from:

  python -m stream.receivers vmc [--port 39539]        print VMC bundles (blendshapes, head)
  python -m stream.receivers livelink [--port 11111]   print Live Link Face packets
  python -m stream.receivers ws [--url ws://127.0.0.1:8080/ws]   print WebSocket messages

Each prints one line per frame: frame/time, head yaw/pitch/roll and the strongest blendshapes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket

from stream import livelink


def _top(bs: dict, n: int = 4) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in sorted(bs.items(), key=lambda kv: -kv[1])[:n])


def _datagrams(name: str, port: int):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print(f"{name}: listening on udp/{port}")
    while True:
        yield sock.recvfrom(65536)[0]


def receive_vmc(port: int) -> None:
    from pythonosc.osc_bundle import OscBundle

    for data in _datagrams("VMC", port):
        msgs = [(m.address, m.params) for m in OscBundle(data)]
        blend = {p[0]: p[1] for a, p in msgs if a == "/VMC/Ext/Blend/Val"}
        head = next((p for a, p in msgs if a == "/VMC/Ext/Bone/Pos" and p[0] == "Head"), None)
        ok = next((p for a, p in msgs if a == "/VMC/Ext/OK"), None)
        quat = "lost" if head is None else "q=(" + ", ".join(f"{v:.3f}" for v in head[4:8]) + ")"
        print(f"tracking={ok[3] if ok else '?'} head {quat} {_top(blend)}")


def receive_livelink(port: int) -> None:
    for data in _datagrams("Live Link", port):
        p = livelink.decode(data)
        if not p["face"]:
            print(f"{p['subject']}: no face")
            continue
        yaw, pitch, roll = (math.degrees(v) for v in p["values"][52:55])
        print(f"{p['subject']} frame {p['frame']} yaw {yaw:.1f} pitch {pitch:.1f} roll {roll:.1f} "
              f"{_top(p['blendshapes'])}")


async def receive_ws(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        print(f"WebSocket: connected to {url}")
        async for m in ws:
            msg = json.loads(m.data)
            if not msg.get("face"):
                print(f"{msg['session']} frame {msg.get('frame')}: no face")
                continue
            e = msg["head"]["euler_deg"]
            print(f"{msg['session']} frame {msg['frame']} yaw {e['yaw']:.1f} pitch {e['pitch']:.1f} "
                  f"roll {e['roll']:.1f} {_top(msg['blendshapes'])}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stream.receivers")
    ap.add_argument("kind", choices=["vmc", "livelink", "ws"])
    ap.add_argument("--port", type=int)
    ap.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    a = ap.parse_args(argv)
    try:
        if a.kind == "vmc":
            receive_vmc(a.port or 39539)
        elif a.kind == "livelink":
            receive_livelink(a.port or livelink.DEFAULT_PORT)
        else:
            asyncio.run(receive_ws(a.url))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
