"""The tracker's rare slow frames from its first frame on: a video played in a loop, per-frame time percentiles
and worst frame, and the garbage collector's pauses during the run (from gc.callbacks).

    python tools/bench_stalls.py "$FACESTREAM_ASSETS/media/liveportrait_d3.mp4" --frames 1500 [--prdl]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (run as a script)
from engine.media import MediaSource  # noqa: E402 - engine before NumPy: one BLAS thread
from engine.pack import Pack  # noqa: E402
from engine.tracker import TrackerConfig  # noqa: E402

import numpy as np  # noqa: E402,I001


class GcPauses:
    """Collections per generation and their durations, while installed."""

    def __init__(self):
        self.ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms[info["generation"]].append(1e3 * (time.perf_counter() - self._t0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video")
    ap.add_argument("--frames", type=int, default=1500, help="frames to track (the video loops)")
    ap.add_argument("--prdl", action="store_true", help="with PRDL refinement (landmark masks)")
    args = ap.parse_args()
    frames = [f.rgb for f in MediaSource(args.video).frames()]
    pack = Pack()
    tracker = pack.tracker(TrackerConfig(prdl=args.prdl))
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    times = []
    for i in range(args.frames):
        t0 = time.perf_counter()
        tracker.process(frames[i % len(frames)], i, t_seconds=i / 30.0)
        times.append(1e3 * (time.perf_counter() - t0))
    gc.callbacks.remove(pauses)
    t = np.asarray(times[1:])  # the first frame (lazy initialisation) is reported apart
    print(f"{Path(args.video).name}: {len(times)} frames, PRDL {'on' if args.prdl else 'off'}, "
          f"objects frozen {gc.get_freeze_count()}, first frame {times[0]:.1f} ms")
    print(f"frame ms: p50 {np.median(t):.2f}  p95 {np.percentile(t, 95):.2f}  p99 {np.percentile(t, 99):.2f}  "
          f"max {t.max():.1f}  frames over 50 ms: {int((t > 50).sum())}")
    for gen, ms in pauses.ms.items():
        if ms:
            print(f"gc generation {gen}: {len(ms)} collections, max {max(ms):.2f} ms, total {sum(ms):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
