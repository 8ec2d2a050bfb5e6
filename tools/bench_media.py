"""Run `facestream bench --json` on every shared face video and print a Markdown table.

    FACESTREAM_ASSETS=/path/to/assets python tools/bench_media.py [--size 640x480] [--no-prdl]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", help="resize frames to WxH (not timed)")
    ap.add_argument("--no-prdl", action="store_true", help="without PRDL refinement (bench runs it by default)")
    args = ap.parse_args()
    media = Path(os.environ["FACESTREAM_ASSETS"]) / "media"
    rows = []
    for video in sorted(media.glob("*.mp4")):
        cmd = [sys.executable, "-m", "engine.cli", "bench", str(video), "--json"] + (["--size", args.size] if args.size else []) \
            + (["--no-prdl"] if args.no_prdl else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        st = r["stages"]
        cell = lambda k: f"{st[k]['median_ms']:.1f} / {st[k]['p95_ms']:.1f}" if k in st else "-"
        rows.append(f"| {video.name} | {r['resolution']} | {r['frames']} | {r['faces']} | {cell('decode')} | "
                    f"{cell('detect')} | {cell('landmarks')} | {cell('regress')} | {cell('segment')} | {cell('prdl')} | "
                    f"{cell('total')} | {r['fps']:.1f} |")
        print(rows[-1], flush=True)
    print("\n| video | size | frames | face | decode | detect | landmarks | regress | segment | prdl | total | fps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nmachine: {r['machine']}; backend {r['backend']}; ms as median / p95")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
