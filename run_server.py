"""Run the facestream live server: `python run_server.py`, then open http://127.0.0.1:8080/ and allow
the camera. See README.md and docs/OUTPUTS.md for the outputs (data channel, WebSocket, VMC, Live Link)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_server.py", description="facestream live server (WebRTC in, "
                                "coefficients and the rendered mesh out)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                   "other machines - browsers allow the camera only on localhost or HTTPS)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-sessions", type=int, default=4, help="sessions beyond this are refused with 503")
    p.add_argument("--loopback-only", action="store_true",
                   help="restrict WebRTC ICE host candidates to 127.0.0.1 (tests, local use)")
    p.add_argument("--backend", default="auto", help="network backend (auto, torch, ...)")
    p.add_argument("--vmc", metavar="HOST:PORT", help="also send every session's coefficients as VMC "
                   "(OSC/UDP) to this receiver, e.g. 127.0.0.1:39539 for VSeeFace")
    p.add_argument("--livelink", metavar="HOST:PORT", help="also send Live Link Face UDP packets, e.g. "
                   "127.0.0.1:11111 for Unreal")
    p.add_argument("--livelink-subject", default="facestream", help="Live Link subject name")
    p.add_argument("--profile", help="calibration profile (JSON) loaded into every new session")
    p.add_argument("--max-width", type=int, default=1280, help="larger frames are scaled down before tracking")
    p.add_argument("--max-height", type=int, default=720)
    p.add_argument("--max-fps", type=float, default=30.0, help="per-session processing rate limit")
    p.add_argument("--no-render", action="store_true", help="do not return the rendered video")
    prdl = p.add_mutually_exclusive_group()
    prdl.add_argument("--prdl", dest="prdl", action="store_true", default=None, help="PRDL refinement on")
    prdl.add_argument("--no-prdl", dest="prdl", action="store_false", help="PRDL refinement off")
    p.add_argument("--batch-ms", type=float, help="batch the networks across sessions, collecting frames for "
                   "at most this many ms (default: 2 on a GPU backend, off on CPU; 0 turns it off)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per network call (default 1: decoding, "
                   "encoding, rendering and other sessions use the other cores)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    from calibration.profile import ProfileError
    from engine.assets import AssetMissingError
    from engine.render import RenderError
    from stream.server import ServerConfig, parse_target, serve
    from stream.session import Limits

    try:
        config = ServerConfig(
            host=args.host, port=args.port, max_sessions=args.max_sessions, loopback_only=args.loopback_only,
            backend=args.backend, vmc=parse_target(args.vmc, 39539) if args.vmc else None,
            livelink=parse_target(args.livelink, 11111) if args.livelink else None,
            livelink_subject=args.livelink_subject, profile=args.profile, render=not args.no_render,
            limits=Limits(args.max_width, args.max_height, args.max_fps), prdl=args.prdl,
            threads=args.threads, batch_ms=args.batch_ms)
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
    except (ValueError, ProfileError, AssetMissingError, RenderError, OSError) as exc:
        print(f"run_server.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
