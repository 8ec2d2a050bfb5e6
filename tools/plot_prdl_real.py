"""Blendshape curves on a real video: regressor alone vs PRDL with landmark masks vs PRDL with parser masks.

    FACESTREAM_ASSETS=/path/to/assets python tools/plot_prdl_real.py liveportrait_d3.mp4 docs/prdl_real_d3.png \
        --mark 112:160:"eyes closed" --mark 296:350:"eyes wide open"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.arkit import ARKIT_NAMES  # noqa: E402
from engine.media import MediaSource  # noqa: E402
from engine.pack import Pack  # noqa: E402
from engine.tracker import TrackerConfig  # noqa: E402

SHAPES = ("eyeBlinkLeft", "eyeBlinkRight", "jawOpen", "mouthPucker", "mouthSmileLeft", "mouthSmileRight",
          "browDownLeft", "browInnerUp")
RUNS = (("regressor only", False, "landmarks"), ("PRDL, landmark masks", True, "landmarks"),
        ("PRDL, parser masks", True, "parser"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("out", type=Path)
    ap.add_argument("--mark", action="append", default=[], help="START:END:LABEL frame range to shade")
    ap.add_argument("--curves", type=Path, help="cache of the tracked curves (.npz): read if it exists, else written")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.curves and args.curves.exists():
        with np.load(args.curves) as z:
            curves = {label: z[f"run{k}"] for k, (label, _, _) in enumerate(RUNS)}
    else:
        path = Path(os.environ["FACESTREAM_ASSETS"]) / "media" / args.video
        frames = [(f.rgb, f.index, f.pts) for f in MediaSource(path).frames()]
        pack = Pack()
        curves = {}
        for label, prdl, masks in RUNS:
            tracker = pack.tracker(TrackerConfig(prdl=prdl), masks=masks)
            states = [tracker.process(rgb, i, pts=pts, t_seconds=pts) for rgb, i, pts in frames]
            curves[label] = np.array([[s.blendshapes[ARKIT_NAMES.index(n)] if s.face else np.nan for n in SHAPES]
                                      for s in states])
        if args.curves:
            np.savez(args.curves, **{f"run{k}": curves[label] for k, (label, _, _) in enumerate(RUNS)})
    summary = {}
    marks = []
    for m in args.mark:
        a, b, text = m.split(":", 2)
        marks.append((int(a), int(b), text))
    fig, axes = plt.subplots(len(SHAPES), 1, figsize=(11, 2.0 * len(SHAPES)), sharex=True)
    for k, (ax, name) in enumerate(zip(axes, SHAPES)):
        for label, c in curves.items():
            ax.plot(c[:, k], label=label, lw=1.2)
        for a, b, text in marks:
            ax.axvspan(a, b, color="orange", alpha=0.15)
            if k == 0:
                ax.text(0.5 * (a + b), 1.02, text, ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(loc="upper left", fontsize=8, ncol=3)
    axes[-1].set_xlabel(f"frame ({args.video})")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    for label, c in curves.items():
        row = {"median": dict(zip(SHAPES, np.round(np.nanmedian(c, 0), 3).tolist()))}
        for a, b, text in marks:
            row[text] = dict(zip(SHAPES, np.round(np.nanmean(c[a:b], 0), 3).tolist()))
        summary[label] = row
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
