"""Contact sheet of a `facestream track` run: every k-th overlay frame with key blendshapes printed.

    python tools/contact_sheet.py OUT_DIR sheet.png [--every 16] [--width 256]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import av
from PIL import Image, ImageDraw

KEYS = (("eyeBlinkLeft", "bL"), ("eyeBlinkRight", "bR"), ("jawOpen", "jaw"), ("mouthSmileLeft", "smL"),
        ("mouthSmileRight", "smR"), ("browDownLeft", "bdL"), ("browInnerUp", "biu"), ("mouthPucker", "pck"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--every", type=int, default=16)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--cols", type=int, default=6)
    args = ap.parse_args()
    msgs = [json.loads(ln) for ln in (args.run / "coefficients.jsonl").read_text().splitlines()]
    tiles = []
    with av.open(str(args.run / "overlay.mp4")) as c:
        for k, frame in enumerate(c.decode(video=0)):
            if k % args.every:
                continue
            im = frame.to_image()
            im = im.resize((args.width, round(im.height * args.width / im.width)))
            d = ImageDraw.Draw(im)
            m = msgs[k]
            if m["face"]:
                b = m["blendshapes"]
                vals = [f"{short}{b[name]:.2f}" for name, short in KEYS]
                e = m["head"]["euler_deg"]
                lines = [f"#{k} " + " ".join(vals[:3]), " ".join(vals[3:]),
                         f"yaw{e['yaw']:.0f} pitch{e['pitch']:.0f} roll{e['roll']:.0f}"]
            else:
                lines = [f"#{k} no face"]
            for i, line in enumerate(lines):
                d.text((3, 2 + 11 * i), line, fill=(255, 255, 0))
            tiles.append(im)
    w, h = tiles[0].size
    rows = (len(tiles) + args.cols - 1) // args.cols
    sheet = Image.new("RGB", (w * args.cols, h * rows))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % args.cols) * w, (i // args.cols) * h))
    sheet.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
