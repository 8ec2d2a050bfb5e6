"""Anchor-grid / point-count ablation of PRDL refinement on synthetic faces (Markdown table).

    FACESTREAM_ASSETS=/path/to/assets python tools/ablate_prdl.py [--faces 60]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.eval_prdl import evaluate  # noqa: E402
from engine.refine import RefineConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=60)
    args = ap.parse_args()
    print("| anchors | points/part | iterations | mean IoU before -> after | MAE all | MAE perturbed | pose err (deg) | ms/face (median) |")
    print("|---|---|---|---|---|---|---|---|")
    settings = [(6, 64, 2, True), (8, 64, 2, True), (8, 96, 3, True), (12, 96, 3, True), (12, 128, 3, True),
                (16, 96, 3, False), (24, 128, 3, False), (32, 128, 3, False)]
    for anchors, points, iterations, local in settings:
        r = evaluate(args.faces, RefineConfig(anchors=anchors, points=points, iterations=iterations,
                                              local_anchors=local))
        grid = f"{anchors}x{anchors} per part" if local else f"{anchors}x{anchors} shared"
        print(f"| {grid} | {points} | {iterations} | {r['mean_iou_before']:.3f} -> {r['mean_iou_after']:.3f} | "
              f"{r['mae_before']:.3f} -> {r['mae_after']:.3f} | {r['perturbed_mae_before']:.3f} -> "
              f"{r['perturbed_mae_after']:.3f} | {r['pose_err_deg_before']:.2f} -> {r['pose_err_deg_after']:.2f} | "
              f"{r['ms_per_face']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
