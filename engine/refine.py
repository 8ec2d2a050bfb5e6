"""Per-frame PRDL refinement of expression and pose (3DDFA-V3's part re-projection distance, online).

After the regressor's answer, a few Gauss-Newton iterations move expression (bounded to [0, 1]) and head
pose so that the re-projected mesh parts (eyes, brows, lips, nose, skin) match the 2D part masks of the
same frame, measured with PRDL's anchor descriptors (min / max / mean distance from a grid of anchors to
each part's points). A prior keeps the answer near the regressor's and the previous frame's; identity is
held. Geometry on arrays only (NumPy here; the PRDL statistics run on CuPy where arrays live on a GPU).

Units: crop coordinates scaled so that the part-mask crop is 100 units wide, whatever its pixel size, so
the prior weights mean the same at any resolution.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine import prdl
from engine.face_model import FaceModel
from engine.geometry import Camera, rodrigues
from engine.raster import vertex_visibility_splat

CROP_UNITS = 100.0


class PartMasks(Protocol):
    """What refinement needs of a segmentation result (engine.segmentation.PartMasks has it); PRDL stays
    free of network code."""

    @property
    def size(self) -> int: ...

    def label_map(self) -> np.ndarray: ...

    def to_crop(self, xy_image) -> np.ndarray: ...


@dataclass
class RefineConfig:
    anchors: int = 16  # anchor grid n x n over the crop
    points: int = 96  # predicted vertices per part (fixed subset) and target pixels per part (FPS)
    iterations: int = 3
    prior: float = 0.5  # pull toward the regressor's expression, per unit weight^2
    temporal: float = 0.2  # pull toward the previous frame's refined expression
    damping: float = 1e-2
    part_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5)


@dataclass
class RefineResult:
    rotation_cam: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    loss_before: float
    loss_after: float
    iterations: int
    visible_parts: list[bool] = field(default_factory=list)


@dataclass
class Targets:
    desc: np.ndarray  # (8, A, 3)
    valid: np.ndarray  # (8,) bool
    anchors: np.ndarray  # (A, 2) crop units
    masks: PartMasks


class PrdlRefiner:
    def __init__(self, model: FaceModel, config: RefineConfig | None = None, fixed_exp: np.ndarray | None = None):
        self.model = model
        self.config = cfg = config or RefineConfig()
        idx, valid = prdl.part_index(model.part_labels, len(model.part_names), max_points=cfg.points,
                                     layout=model.neutral[:, :2])
        self.sel = np.unique(idx[valid])
        pos = np.full(model.n_vertices, -1, np.int64)
        pos[self.sel] = np.arange(len(self.sel))
        self.part_pos = np.where(valid, pos[np.maximum(idx, 0)], 0)
        self.part_valid = valid
        self.neutral = model.neutral[self.sel].astype(np.float64)
        self.id_basis = model.id_basis[:, self.sel].astype(np.float64)
        self.exp_basis = model.exp_basis[:, self.sel].astype(np.float64)
        self.fixed_exp = np.zeros(model.n_exp, bool) if fixed_exp is None else np.asarray(fixed_exp, bool)
        # visibility: the face surface and the eyeballs are separate layers (a closed lid hides the eye)
        layers = np.zeros(model.n_vertices, np.int64)
        for sl in model.eyeball_slices.values():
            layers[sl] = 1
        self.layers = layers
        self.anchors_unit = prdl.anchor_grid(cfg.anchors, (0.0, 0.0, CROP_UNITS, CROP_UNITS))

    # ------------------------------------------------------------------ targets
    def targets(self, masks: PartMasks) -> Targets:
        """Target descriptors of the frame's part masks (computed once per frame)."""
        labels = masks.label_map()
        sets = prdl.label_point_sets(labels, len(self.model.part_names), max_points=self.config.points)
        k = CROP_UNITS / masks.size
        sets = [(s + 0.5) * k for s in sets]  # pixel centres -> crop units
        pts, mask = prdl.pack_parts(sets, np, dtype=np.float64)
        desc = prdl.part_descriptors(pts, mask, self.anchors_unit, np)
        return Targets(desc, mask.any(1), self.anchors_unit, masks)

    # ------------------------------------------------------------------ geometry
    def _crop_affine(self, masks: PartMasks) -> tuple[np.ndarray, np.ndarray]:
        """Image pixels -> crop units as x' = M x + b."""
        o = masks.to_crop(np.zeros((1, 2)))[0]
        m = np.stack([masks.to_crop(np.array([[1.0, 0.0]]))[0] - o,
                      masks.to_crop(np.array([[0.0, 1.0]]))[0] - o], axis=1)
        k = CROP_UNITS / masks.size
        return m * k, (o + 0.5) * k

    def visibility(self, rc: np.ndarray, t: np.ndarray, identity: np.ndarray, expression: np.ndarray,
                   camera: Camera, masks: PartMasks) -> np.ndarray:
        """(len(sel),) bool: which of the sampled part vertices the camera sees (splat z-buffer)."""
        verts = self.model.vertices(identity, expression).astype(np.float64) @ rc.T + t
        m, b = self._crop_affine(masks)
        uv = camera.project(verts) @ m.T + b
        px_per_cm = np.linalg.norm(m[:, 0]) * camera.fx / max(t[2], 1e-3)
        cell = max(0.3 * px_per_cm, 0.5)  # about the mesh's vertex spacing
        vis = vertex_visibility_splat(np.column_stack([uv, verts[:, 2]]), int(CROP_UNITS) + 1,
                                      int(CROP_UNITS) + 1, radius=cell, tol=0.5, layers=self.layers,
                                      layer_tol=0.05)
        return vis[self.sel]

    def _points_and_jacobian(self, rc, t, exp, identity, camera, m, b, free):
        x = self.neutral + np.tensordot(identity, self.id_basis, 1) + np.tensordot(exp, self.exp_basis, 1)
        rp = x @ rc.T
        pc = rp + t
        z = pc[:, 2]
        a = np.zeros((len(z), 2, 3))
        a[:, 0, 0] = camera.fx / z
        a[:, 0, 2] = -camera.fx * pc[:, 0] / z**2
        a[:, 1, 1] = camera.fy / z
        a[:, 1, 2] = -camera.fy * pc[:, 1] / z**2
        a = np.einsum("ij,njk->nik", m, a)  # image px -> crop units
        uv = np.stack([camera.fx * pc[:, 0] / z + camera.cx, camera.fy * pc[:, 1] / z + camera.cy], 1) @ m.T + b
        n_e = int(free.sum())
        jac = np.empty((len(z), 2, 6 + n_e))
        for k in range(3):
            ek = np.zeros(3)
            ek[k] = 1.0
            jac[:, :, k] = np.einsum("nij,nj->ni", a, np.cross(ek, rp))
        jac[:, :, 3:6] = a
        rexp = np.einsum("ij,knj->kni", rc, self.exp_basis[free])
        jac[:, :, 6:] = np.einsum("nij,knj->nik", a, rexp)
        return uv, jac

    # ------------------------------------------------------------------ refinement
    def refine(self, targets: Targets, camera: Camera, rotation_cam: np.ndarray, translation: np.ndarray,
               expression: np.ndarray, identity: np.ndarray, *, exp_prior: np.ndarray | None = None,
               exp_prev: np.ndarray | None = None) -> RefineResult:
        cfg = self.config
        rc, t = rotation_cam.copy(), translation.astype(np.float64).copy()
        e = np.clip(expression.astype(np.float64), 0.0, 1.0)
        prior = e.copy() if exp_prior is None else exp_prior
        m, b = self._crop_affine(targets.masks)
        vis = self.visibility(rc, t, identity, e, camera, targets.masks)
        mask = self.part_valid & vis[self.part_pos]
        free = ~self.fixed_exp
        n_e = int(free.sum())
        weights = np.asarray(cfg.part_weights, np.float64)
        loss_before = loss = None
        it = 0
        for it in range(1, cfg.iterations + 1):
            uv, jac = self._points_and_jacobian(rc, t, e, identity, camera, m, b, free)
            pts = uv[self.part_pos]
            terms = prdl.gauss_newton_terms(pts, mask, targets.desc, targets.anchors, weights,
                                            target_valid=targets.valid)
            loss = terms.loss
            if loss_before is None:
                loss_before = loss
            jtj, jtr = prdl.normal_equations(jac[self.part_pos], terms)
            ef = e[free]
            sl = slice(6, 6 + n_e)
            diag = np.full(n_e, cfg.prior)
            jtr[sl] += cfg.prior * (ef - prior[free])
            if exp_prev is not None:
                diag += cfg.temporal
                jtr[sl] += cfg.temporal * (ef - exp_prev[free])
            jtj[sl, sl] += np.diag(diag)
            active = np.ones(6 + n_e, bool)
            active[sl] = ~(((ef <= 0.0) & (jtr[sl] > 0)) | ((ef >= 1.0) & (jtr[sl] < 0)))
            h = jtj[np.ix_(active, active)]
            h = h + cfg.damping * np.diag(np.diag(h) + 1e-6)
            delta = np.zeros(6 + n_e)
            delta[active] = -np.linalg.solve(h, jtr[active])
            rc = rodrigues(delta[:3]) @ rc
            t = t + delta[3:6]
            e[free] = np.clip(ef + delta[sl], 0.0, 1.0)
        uv, _ = self._points_and_jacobian(rc, t, e, identity, camera, m, b, free)
        loss_after = prdl.gauss_newton_terms(uv[self.part_pos], mask, targets.desc, targets.anchors, weights,
                                             target_valid=targets.valid).loss
        if loss_after > loss_before:  # never hand back something worse than the start
            rc, t, e, loss_after = rotation_cam.copy(), translation.copy(), np.clip(expression, 0, 1), loss_before
        return RefineResult(rc, t, e, float(loss_before), float(loss_after), it,
                            [bool(v) for v in (mask.any(1) & targets.valid)])
