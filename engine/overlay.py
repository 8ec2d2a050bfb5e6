"""Software overlay of the fitted mesh on a frame (for `facestream track`; the live server renders
with moderngl instead). Front-facing vertices are splatted as shaded dots coloured by PRDL part."""
from __future__ import annotations

import numpy as np

from engine.face_model import FaceModel
from engine.geometry import FLIP, Camera
from engine.messages import FaceState

PART_COLOURS = np.array([
    (80, 160, 255), (80, 160, 255),  # eyes
    (255, 200, 60), (255, 200, 60),  # brows
    (255, 80, 120), (200, 60, 200),  # upper / lower lip
    (90, 220, 120),                  # nose
    (200, 200, 200),                 # skin
], dtype=np.float32)
UNLABELLED = np.array((150, 150, 150), np.float32)


class MeshOverlay:
    def __init__(self, model: FaceModel, alpha: float = 0.45):
        self.model = model
        self.alpha = alpha
        labels = model.part_labels
        self.colours = np.where(labels[:, None] >= 0, PART_COLOURS[np.clip(labels, 0, None)], UNLABELLED)
        self.normals = _vertex_normals(model.vertices(np.zeros(model.n_id), np.zeros(model.n_exp)), model.faces)

    def draw(self, rgb: np.ndarray, state: FaceState, camera: Camera) -> np.ndarray:
        out = rgb.copy()
        if not state.face:
            return out
        rc = FLIP @ state.rotation
        verts = self.model.vertices(state.identity, state.expression) @ rc.T + state.translation_cm
        normals = self.normals @ rc.T
        view = -verts / np.linalg.norm(verts, axis=1, keepdims=True)
        facing = (normals * view).sum(1)
        uv = camera.project(verts)
        h, w = rgb.shape[:2]
        # splat each vertex as a small square sized to the mesh spacing; drawn far to near, so the
        # eyelids cover the eyeballs when the eyes close
        px_per_cm = camera.fx / max(float(state.translation_cm[2]), 1.0)
        half = int(np.clip(round(0.12 * px_per_cm), 0, 3))
        keep = facing > 0.05
        order = np.argsort(-verts[keep, 2])
        uvk = uv[keep][order]
        shade = (0.35 + 0.65 * facing[keep][order])[:, None]
        colour = self.colours[keep][order] * shade
        layer = out.astype(np.float32)
        painted = np.zeros((h, w), bool)
        cx, cy = np.round(uvk[:, 0]).astype(int), np.round(uvk[:, 1]).astype(int)
        for dy in range(-half, half + 1):
            for dx in range(-half, half + 1):
                xs, ys = cx + dx, cy + dy
                ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
                layer[ys[ok], xs[ok]] = colour[ok]
                painted[ys[ok], xs[ok]] = True
        blend = (1 - self.alpha) * out[painted] + self.alpha * layer[painted]
        out[painted] = np.clip(blend, 0, 255).astype(np.uint8)
        if state.landmarks68 is not None:
            for px, py in np.round(state.landmarks68).astype(int):
                out[max(py - 1, 0):py + 2, max(px - 1, 0):px + 2] = (255, 40, 40)
        return out


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-9)
