"""The `facestream` command: the engine's commands (track, bench, assets, calibrate, eval-prdl) plus the
live ones that need the stream package (bench-live). The engine never imports stream/, so the live
commands are added here, one level up."""
from __future__ import annotations

import sys

LIVE_COMMANDS = {"bench-live": "stream.bench_live"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIVE_COMMANDS:
        import importlib

        return importlib.import_module(LIVE_COMMANDS[argv[0]]).main(argv[1:])
    from engine.cli import main as engine_main

    code = engine_main(argv)
    if argv in ([], ["-h"], ["--help"]):
        print("\nlive commands:\n  bench-live   concurrent WebRTC sessions over loopback (see "
              "`facestream bench-live --help`); the server itself is `python run_server.py`")
    return code
