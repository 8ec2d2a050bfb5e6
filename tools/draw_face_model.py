"""Draw the ICT tracking mesh from the front, coloured by PRDL part, with the landmark sets.

    python tools/draw_face_model.py [--out docs/face_model_parts.png]

Left panel: neutral face, triangles coloured by part label (grey: no label), the 478 MediaPipe
landmarks (small red dots) and ICT's 68 Multi-PIE points (blue). Right panel: the same mesh with
jawOpen=0.5 and eyeBlink_L=1 (subject's left eye closed), showing that the lip and lid landmarks
follow the correct lip / lid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.face_model import PART_NAMES, FaceModel  # noqa: E402

PART_COLOURS = {
    "left_eye": "#1f77b4", "right_eye": "#17becf", "left_brow": "#8c564b", "right_brow": "#d2a679",
    "upper_lip": "#d62728", "lower_lip": "#ff9896", "nose": "#2ca02c", "skin": "#f7d9b8",
}
NONE_COLOUR = "#9a9a9a"


def draw_mesh(ax, verts, faces, labels, title):
    v = verts[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    front = n[:, 2] > 0
    v, n, f = v[front], n[front], faces[front]
    order = np.argsort(v[:, :, 2].mean(1))  # painter's algorithm, far first
    v, n, f = v[order], n[order], f[order]
    lab = labels[f]
    # a triangle takes the label most of its corners have (ties: first corner)
    tri_lab = np.where((lab[:, 1] == lab[:, 2]) & (lab[:, 1] != lab[:, 0]), lab[:, 1], lab[:, 0])
    palette = np.array([matplotlib.colors.to_rgb(PART_COLOURS[p]) for p in PART_NAMES]
                       + [matplotlib.colors.to_rgb(NONE_COLOUR)])
    base = palette[np.where(tri_lab < 0, len(PART_NAMES), tri_lab)]
    light = np.array([0.3, 0.4, 1.0])
    light /= np.linalg.norm(light)
    shade = 0.45 + 0.55 * np.clip(n @ light, 0, 1)
    ax.add_collection(PolyCollection(v[:, :, :2], facecolors=base * shade[:, None], edgecolors="none",
                                     antialiased=False))
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.axis("off")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "face_model_parts.png"))
    ap.add_argument("--dpi", type=int, default=110)
    args = ap.parse_args(argv)

    fm = FaceModel.load()
    exp = np.zeros(fm.n_exp, np.float32)
    panels = [("neutral: part labels, 478 MediaPipe landmarks (red), 68 Multi-PIE points (blue)", exp)]
    e2 = exp.copy()
    e2[fm.exp_names.index("jawOpen")] = 0.5
    e2[fm.exp_names.index("eyeBlink_L")] = 1.0
    panels.append(("jawOpen=0.5, eyeBlink_L=1 (subject's left eye, image right)", e2))

    fig, axes = plt.subplots(1, 2, figsize=(16, 11))
    for ax, (title, e) in zip(axes, panels):
        verts = fm.vertices(None, e)
        draw_mesh(ax, verts, fm.faces, fm.part_labels, title)
        lm = fm.landmarks(None, e)
        lm68 = fm.landmarks68(None, e)
        ax.scatter(lm[:468, 0], lm[:468, 1], s=3, c="red", zorder=3, linewidths=0)
        ax.scatter(lm[468:, 0], lm[468:, 1], s=8, c="magenta", zorder=3, linewidths=0)
        ax.scatter(lm68[:, 0], lm68[:, 1], s=10, c="blue", zorder=4, linewidths=0)
        x0, x1 = verts[: fm.n_face_vertices, 0].min(), verts[: fm.n_face_vertices, 0].max()
        y0, y1 = verts[: fm.n_face_vertices, 1].min(), verts[: fm.n_face_vertices, 1].max()
        ax.set_xlim(x0 - 0.5, x1 + 0.5)
        ax.set_ylim(y0 - 0.5, y1 + 0.5)
        ax.text(x0, y0 - 0.3, "subject's right  <-  x  ->  subject's left", fontsize=8)
    counts = {p: int((fm.part_labels == k).sum()) for k, p in enumerate(PART_NAMES)}
    handles = [Patch(color=PART_COLOURS[p], label=f"{p} ({counts[p]})") for p in PART_NAMES]
    handles.append(Patch(color=NONE_COLOUR, label=f"none ({int((fm.part_labels < 0).sum())})"))
    fig.legend(handles=handles, loc="lower center", ncol=9, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
