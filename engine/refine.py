"""Per-frame PRDL refinement of expression and pose (3DDFA-V3's part re-projection distance, online).

After the regressor's answer, a few Levenberg-Marquardt iterations move expression (bounded to [0, 1]) and
head pose so that the re-projected mesh parts (eyes, brows, lips, nose, skin) match the 2D part masks of
the same frame, measured with PRDL's anchor descriptors (min / max / mean distance from a grid of anchors
to each part's points). A prior keeps the answer near the regressor's and the previous frame's; identity
is held. Geometry on arrays only: no network code, no torch.

Point sets: a part's target pixels and its visible re-projected points are both thinned with the same
grid (one point per cell, the one nearest the cell centre), so the two sets have the same density and the
descriptors agree at the true answer (fixed vertex subsets follow the mesh's uneven vertex density, which
biases f_mean and the optimum). Eyes are represented by points blended between paired upper- and
lower-lid landmarks: an eyeball's own vertices do not move when the lids close (only their visibility
changes, which has no gradient).

Units: crop coordinates scaled so that the part-mask crop is 100 units wide, whatever its pixel size, so
the prior weights mean the same at any resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine import prdl
from engine.face_model import FaceModel
from engine.geometry import Camera, rodrigues
from engine.raster import vertex_visibility_splat

CROP_UNITS = 100.0
# paired lower/upper lid landmarks (MediaPipe indices, corner to corner, subject's sides)
EYE_LIDS = {
    "left_eye": ((263, 249, 390, 373, 374, 380, 381, 382, 362), (263, 466, 388, 387, 386, 385, 384, 398, 362)),
    "right_eye": ((33, 7, 163, 144, 145, 153, 154, 155, 133), (33, 246, 161, 160, 159, 158, 157, 173, 133)),
}
LID_BLENDS = np.linspace(0.0, 1.0, 9)
MIN_CELL = 1.0  # crop units; about the mesh's vertex spacing at a typical crop
CANDIDATES_PER_POINT = 4


class PartMasks(Protocol):
    """What refinement needs of a segmentation result (engine.segmentation.PartMasks has it)."""

    @property
    def size(self) -> int: ...

    def label_map(self) -> np.ndarray: ...

    def to_crop(self, xy_image) -> np.ndarray: ...


@dataclass
class RefineConfig:
    anchors: int = 8  # anchor grid n x n: per part around its target region (local), or over the crop
    local_anchors: bool = True  # one grid per part (small parts get as many anchors as the skin)
    anchor_margin: float = 0.35  # local grids extend this fraction of the part's size beyond it
    points: int = 96  # about this many points per part, target and prediction alike
    iterations: int = 3
    prior: float = 1.0  # pull toward the regressor's expression, per unit weight^2
    temporal: float = 0.3  # pull toward the previous frame's refined expression
    damping: float = 1e-2
    mean_anchor_stride: int = 2  # Gauss-Newton matrix of the mean-distance rows from every k-th anchor
    part_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass
class RefineResult:
    rotation_cam: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    loss_before: float
    loss_after: float
    iterations: int
    used_parts: list[bool] = field(default_factory=list)


@dataclass
class Targets:
    desc: np.ndarray  # (8, A, 3)
    valid: np.ndarray  # (8,) bool
    cells: np.ndarray  # (8,) thinning grid cell per part, crop units
    anchors: np.ndarray  # (8, A, 2) per-part grids or (A, 2) one grid, crop units
    masks: PartMasks


def grid_thin(points: np.ndarray, cell: float) -> np.ndarray:
    """Indices of one point per occupied grid cell: the point nearest the cell's centre."""
    if len(points) == 0:
        return np.zeros(0, np.int64)
    g = np.floor(points / cell)
    key = g[:, 0] * 1_000_003.0 + g[:, 1]
    off = points - (g + 0.5) * cell
    d = (off * off).sum(1)
    order = np.lexsort((d, key))
    first = np.ones(len(order), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    return order[first]


def thin_to(points: np.ndarray, cell: float, pmax: int) -> np.ndarray:
    idx = grid_thin(points, cell)
    while len(idx) > pmax:  # rare: a part larger than its target; coarsen until it fits
        cell *= np.sqrt(len(idx) / pmax) * 1.05
        idx = grid_thin(points, cell)
    return idx


class PrdlRefiner:
    def __init__(self, model: FaceModel, config: RefineConfig | None = None, fixed_exp: np.ndarray | None = None):
        self.model = model
        self.config = cfg = config or RefineConfig()
        self.pmax = int(1.5 * cfg.points)
        names = list(model.part_names)
        labels = np.asarray(model.part_labels)
        eye_parts = [names.index(p) for p in EYE_LIDS]
        # candidate vertices: each part's vertices, thinned once (on the neutral face seen from the front)
        # to a few times the points a frame needs, which keeps every frame's projection and thinning small
        idx, valid = prdl.part_index(np.where(np.isin(labels, eye_parts), -1, labels), len(names),
                                     max_points=CANDIDATES_PER_POINT * cfg.points, layout=model.neutral[:, :2])
        verts = np.sort(idx[valid])
        # eye-opening points: blends of landmark points, appended after the vertices
        blends, blend_part, proxy = [], [], []
        eyeball_ids = np.concatenate([np.arange(model.n_vertices)[sl] for sl in model.eyeball_slices.values()])
        n_lm = model.lm_neutral.shape[0]
        for part, (lower, upper) in EYE_LIDS.items():
            rows = []
            for a, b in zip(lower[1:-1], upper[1:-1]):
                for w in LID_BLENDS:
                    row = np.zeros(n_lm)
                    row[a], row[b] = 1.0 - w, w
                    rows.append(row)
            for corner in (lower[0], lower[-1]):
                row = np.zeros(n_lm)
                row[corner] = 1.0
                rows.append(row)
            rows = np.array(rows)
            pts = rows @ model.lm_surface
            d = np.linalg.norm(model.neutral[eyeball_ids][None] - pts[:, None], axis=2)
            proxy.extend(eyeball_ids[d.argmin(1)])  # visible when the eyeball behind it is
            blends.extend(rows)
            blend_part.extend([names.index(part)] * len(rows))
        blends = np.array(blends)
        self.cand_part = np.concatenate([labels[verts], blend_part]).astype(np.int64)
        self.vis_source = np.concatenate([verts, np.array(proxy, np.int64)])
        self.neutral = np.concatenate([model.neutral[verts], blends @ model.lm_surface]).astype(np.float64)
        self.id_basis = np.concatenate([model.id_basis[:, verts], np.einsum("pl,kld->kpd", blends, model.lm_id)],
                                       axis=1).astype(np.float64)
        exp_basis = np.concatenate([model.exp_basis[:, verts], np.einsum("pl,kld->kpd", blends, model.lm_exp)],
                                   axis=1).astype(np.float64)
        self.exp_basis = exp_basis
        self.exp_basis_nk = np.ascontiguousarray(exp_basis.transpose(1, 2, 0))  # (points, 3, 53) for gathers
        self.exp_flat = np.ascontiguousarray(exp_basis.reshape(len(exp_basis), -1))
        self.fixed_exp = np.zeros(model.n_exp, bool) if fixed_exp is None else np.asarray(fixed_exp, bool)
        layers = np.zeros(model.n_vertices, np.int64)
        for sl in model.eyeball_slices.values():
            layers[sl] = 1  # the eyeballs are their own depth layer: a closed lid hides them
        self.layers = layers
        # float32 distance statistics: half the memory traffic of float64, ~1e-3 unit error (prdl.py)
        self.anchors_unit = prdl.anchor_grid(cfg.anchors, (0.0, 0.0, CROP_UNITS, CROP_UNITS), dtype=np.float32)
        self.n_parts = len(names)

    # ------------------------------------------------------------------ targets
    def targets(self, masks: PartMasks) -> Targets:
        """Target descriptors of one frame's part masks."""
        cfg = self.config
        labels = masks.label_map()
        k = CROP_UNITS / masks.size
        sets, cells, grids = [], np.zeros(self.n_parts), []
        for p in range(self.n_parts):
            rows, cols = np.nonzero(labels == p)
            pts = (np.column_stack([cols, rows]).astype(np.float64) + 0.5) * k
            cell = max(np.sqrt(len(pts) * k * k / cfg.points), MIN_CELL)
            cells[p] = cell
            sets.append(pts[thin_to(pts, cell, self.pmax)])
            if cfg.local_anchors and len(pts):
                lo, hi = pts.min(0), pts.max(0)
                pad = cfg.anchor_margin * max(hi - lo) + 2.0
                grids.append(prdl.anchor_grid(cfg.anchors, (*(lo - pad), *(hi + pad)), dtype=np.float32))
            else:
                grids.append(self.anchors_unit)
        anchors = np.stack(grids) if cfg.local_anchors else self.anchors_unit
        pts, mask = prdl.pack_parts(sets, np, dtype=np.float64, pmax=self.pmax)
        desc = prdl.part_descriptors(pts.astype(np.float32), mask, anchors, np)
        return Targets(desc.astype(np.float32), mask.any(1), cells, anchors, masks)

    # ------------------------------------------------------------------ geometry
    def _crop_affine(self, masks: PartMasks) -> tuple[np.ndarray, np.ndarray]:
        """Image pixels -> crop units as x' = M x + b."""
        o = masks.to_crop(np.zeros((1, 2)))[0]
        m = np.stack([masks.to_crop(np.array([[1.0, 0.0]]))[0] - o,
                      masks.to_crop(np.array([[0.0, 1.0]]))[0] - o], axis=1)
        k = CROP_UNITS / masks.size
        return m * k, (o + 0.5) * k

    def visibility(self, rc, t, identity, expression, camera: Camera, m, b) -> np.ndarray:
        """Which candidate points the camera sees (splat z-buffer over the whole tracking mesh)."""
        verts = self.model.vertices(identity, expression).astype(np.float64) @ rc.T + t
        uv = camera.project(verts) @ m.T + b
        px_per_cm = np.linalg.norm(m[:, 0]) * camera.fx / max(t[2], 1e-3)
        cell = max(0.3 * px_per_cm, 0.5)  # about the mesh's vertex spacing
        vis = vertex_visibility_splat(np.column_stack([uv, verts[:, 2]]), int(CROP_UNITS) + 1,
                                      int(CROP_UNITS) + 1, radius=cell, tol=0.5, layers=self.layers,
                                      layer_tol=0.05)
        return vis[self.vis_source]

    def _select(self, uv: np.ndarray, visible: np.ndarray, cells: np.ndarray):
        """Thinned visible points per part -> (index (8, pmax) into candidates, mask (8, pmax))."""
        index = np.zeros((self.n_parts, self.pmax), np.int64)
        mask = np.zeros((self.n_parts, self.pmax), bool)
        for p in range(self.n_parts):
            cand = np.nonzero((self.cand_part == p) & visible)[0]
            sel = cand[thin_to(uv[cand], cells[p], self.pmax)]
            index[p, :len(sel)] = sel
            mask[p, :len(sel)] = True
        return index, mask

    def _project(self, base, rc, t, e, camera, m, b):
        x = base + (e @ self.exp_flat).reshape(base.shape)
        rp = x @ rc.T
        pc = rp + t
        uv = np.stack([camera.fx * pc[:, 0] / pc[:, 2] + camera.cx,
                       camera.fy * pc[:, 1] / pc[:, 2] + camera.cy], 1) @ m.T + b
        return uv, rp, pc

    def _jacobian(self, index, mask, rp, pc, rc, camera, m, free):
        """d(crop point)/d(rotation, translation, free expressions) for the selected points,
        (parts, pmax, 2, n); padded slots stay zero."""
        n_e = int(free.sum())
        jac = np.zeros(index.shape + (2, 6 + n_e))
        rows = index[mask]
        rp, pc = rp[rows], pc[rows]
        z = pc[:, 2]
        a = np.zeros((len(z), 2, 3))
        a[:, 0, 0] = camera.fx / z
        a[:, 0, 2] = -camera.fx * pc[:, 0] / z**2
        a[:, 1, 1] = camera.fy / z
        a[:, 1, 2] = -camera.fy * pc[:, 1] / z**2
        a = m @ a  # image px -> crop units
        j = np.empty((len(z), 2, 6 + n_e))
        # left-multiplied rotation increment w: d(pc) = w x rp = -[rp]x w
        cross = np.zeros((len(z), 3, 3))
        cross[:, 0, 1], cross[:, 0, 2] = rp[:, 2], -rp[:, 1]
        cross[:, 1, 0], cross[:, 1, 2] = -rp[:, 2], rp[:, 0]
        cross[:, 2, 0], cross[:, 2, 1] = rp[:, 1], -rp[:, 0]
        j[:, :, :3] = a @ cross
        j[:, :, 3:6] = a
        basis = self.exp_basis_nk[rows][:, :, free]  # (n, 3, k)
        basis = np.einsum("ij,njk->nik", rc, basis)  # rotated expression deltas
        j[:, :, 6:] = (a[:, :, :, None] * basis[:, None, :, :]).sum(2)
        jac[mask] = j
        return jac

    # ------------------------------------------------------------------ refinement
    def refine(self, targets: Targets, camera: Camera, rotation_cam: np.ndarray, translation: np.ndarray,
               expression: np.ndarray, identity: np.ndarray, *, exp_prior: np.ndarray | None = None,
               exp_prev: np.ndarray | None = None) -> RefineResult:
        cfg = self.config
        rc, t = rotation_cam.copy(), translation.astype(np.float64).copy()
        e = np.clip(expression.astype(np.float64), 0.0, 1.0)
        prior = e.copy() if exp_prior is None else np.asarray(exp_prior, np.float64)
        m, b = self._crop_affine(targets.masks)
        base = self.neutral + np.tensordot(identity, self.id_basis, 1)
        visible = self.visibility(rc, t, identity, e, camera, m, b)
        free = ~self.fixed_exp
        n_e = int(free.sum())
        weights = np.asarray(cfg.part_weights, np.float64)

        def prior_cost(e_):
            d = e_[free] - prior[free]
            total = cfg.prior * float(d @ d)
            if exp_prev is not None:
                dp = e_[free] - exp_prev[free]
                total += cfg.temporal * float(dp @ dp)
            return total

        def trial_loss(rc_, t_, e_, index, mask):
            """Objective at a trial step, with the iteration's point selection (descriptors only)."""
            uv, _, _ = self._project(base, rc_, t_, e_, camera, m, b)
            desc = prdl.part_descriptors(uv[index].astype(np.float32), mask, targets.anchors, np)
            r = (desc - targets.desc) * w_scale
            return float((r * r).sum()) + prior_cost(e_)

        w_used = weights * targets.valid
        uv, rp, pc = self._project(base, rc, t, e, camera, m, b)
        index, mask = self._select(uv, visible, targets.cells)
        w_scale = np.sqrt(w_used * mask.any(1) / targets.anchors.shape[-2])[:, None, None]
        terms = prdl.gauss_newton_terms(uv[index].astype(np.float32), mask, targets.desc, targets.anchors, weights,
                                        target_valid=targets.valid)
        loss_before = terms.loss
        lam = cfg.damping
        it = 0
        for it in range(1, cfg.iterations + 1):
            if it > 1:  # re-thin the moved points once per iteration; trials below keep this selection
                uv, rp, pc = self._project(base, rc, t, e, camera, m, b)
                index, mask = self._select(uv, visible, targets.cells)
                w_scale = np.sqrt(w_used * mask.any(1) / targets.anchors.shape[-2])[:, None, None]
                terms = prdl.gauss_newton_terms(uv[index].astype(np.float32), mask, targets.desc, targets.anchors,
                                                weights, target_valid=targets.valid)
            total = terms.loss + prior_cost(e)
            jac = self._jacobian(index, mask, rp, pc, rc, camera, m, free)
            jtj, jtr = (x.astype(np.float64) for x in prdl.normal_equations(
                jac.astype(np.float32), terms, mean_anchor_stride=cfg.mean_anchor_stride))
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
            hh = jtj[np.ix_(active, active)]
            improved = False
            for _ in range(4):  # Levenberg-Marquardt: shrink the step until the objective drops
                h = hh + lam * np.diag(np.diag(hh) + 1e-6)
                delta = np.zeros(6 + n_e)
                delta[active] = -np.linalg.solve(h, jtr[active])
                rc_n, t_n, e_n = rodrigues(delta[:3]) @ rc, t + delta[3:6], e.copy()
                e_n[free] = np.clip(ef + delta[sl], 0.0, 1.0)
                if trial_loss(rc_n, t_n, e_n, index, mask) < total:
                    rc, t, e = rc_n, t_n, e_n
                    lam = max(lam * 0.3, 1e-4)
                    improved = True
                    break
                lam *= 10.0
            if not improved:
                break
        uv, _, _ = self._project(base, rc, t, e, camera, m, b)
        index, mask = self._select(uv, visible, targets.cells)
        terms = prdl.gauss_newton_terms(uv[index].astype(np.float32), mask, targets.desc, targets.anchors, weights,
                                        target_valid=targets.valid)
        geo = (index, mask)
        used = [bool(v) for v in (geo[1].any(1) & targets.valid)]
        if terms.loss > loss_before:  # re-thinning can cost a little: never return worse than the start
            return RefineResult(rotation_cam.copy(), translation.copy(), np.clip(expression, 0.0, 1.0),
                                float(loss_before), float(loss_before), it, used)
        return RefineResult(rc, t, e, float(loss_before), float(terms.loss), it, used)
