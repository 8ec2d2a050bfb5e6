"""Anchor-grid / point-count ablation of PRDL refinement on synthetic faces (Markdown table).

    FACESTREAM_ASSETS=/path/to/assets python tools/ablate_prdl.py [--faces 60] [--seed 0]

ms: target descriptors and refinement per face (median wall time, this process single-threaded; each face's
refinement runs right after its label images are rendered, with caches as cold as in a tracker's frame).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.eval_prdl import evaluate  # noqa: E402
from engine.refine import RefineConfig  # noqa: E402

# (anchors, points, iterations, candidates per point, per-part grids)
SETTINGS = [(5, 80, 3, 16, True), (6, 64, 3, 16, True), (6, 80, 2, 16, True), (6, 80, 3, 12, True),
            (6, 80, 3, 16, True), (6, 80, 4, 16, True), (6, 96, 3, 16, True), (8, 80, 3, 16, True),
            (8, 96, 3, 16, True), (12, 96, 3, 16, True), (8, 128, 3, 16, True), (16, 96, 3, 16, False)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| anchors | points/part | iterations | candidates/point | mean IoU before -> after | the same, masks >= 10 px | "
          "lowest part after | MAE all | MAE perturbed | pose err (deg) | ms targets + refinement (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for anchors, points, iterations, cand, local in SETTINGS:
        r = evaluate(args.faces, RefineConfig(anchors=anchors, points=points, iterations=iterations,
                                              candidates=cand, local_anchors=local), seed=args.seed)
        grid = f"{anchors}x{anchors} per part" if local else f"{anchors}x{anchors} shared"
        low = min(r["iou_after"], key=r["iou_after"].get)
        print(f"| {grid} | {points} | {iterations} | {cand} | {r['mean_iou_before']:.3f} -> {r['mean_iou_after']:.3f} | "
              f"{r['mean_iou_after_no_slivers']:.3f} | {low} {r['iou_after'][low]:.3f} | {r['mae_before']:.3f} -> {r['mae_after']:.3f} | "
              f"{r['perturbed_mae_before']:.3f} -> {r['perturbed_mae_after']:.3f} | "
              f"{r['pose_err_deg_before']:.2f} -> {r['pose_err_deg_after']:.2f} | "
              f"{r['ms_targets']:.1f} + {r['ms_refine']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
