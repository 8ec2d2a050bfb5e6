"""Per-frame PRDL refinement of expression and pose (3DDFA-V3's part re-projection distance, online).

After the regressor's answer, a few Levenberg-Marquardt iterations move expression (bounded to [0, 1]) and
head pose so that the re-projected mesh parts (eyes, brows, lips, nose, skin) match the 2D part masks of
the same frame, measured with PRDL's anchor descriptors (min / max / mean distance from a grid of anchors
to each part's points). A prior keeps the answer near the regressor's and the previous frame's; identity
is held. Geometry on arrays only: no network code, no torch.

Point sets (so that the loss is lowest at the true answer): the prediction of a part is a fixed set of
surface samples -- centroids of the sub-triangles of every triangle carrying the part's label, the label
the rasteriser gives the triangle -- kept when visible (a splat z-buffer of the face surface). Eyes are
samples blended between the upper and lower lid edges (the vertex ring around the face surface's eye hole):
an eyeball's own vertices do not move when the lids close, only their visibility changes, which has no
gradient. Targets and predictions are reduced the same way: each part's points are grouped on a square
grid (cell chosen for about ``points`` cells per part) and every occupied cell gives one point, the mean of
its members -- pixel squares (2 x 2 samples per pixel) for targets, surface samples for predictions -- so
both are box-filtered pictures of their regions with the same density. A predicted cell mean is a fixed
average of model points within an iteration, so it moves smoothly with the parameters; its Jacobian is that
of the member nearest the cell centre.

Iterations: the Gauss-Newton matrix is built once per call (from the start's Jacobian); every iteration takes a
fresh gradient (`slot_gradient`, no Jacobian formed) and a damped step. A trial step is evaluated completely --
candidates projected, cells re-selected, residuals and gradient -- so an accepted step is the next iteration's
evaluation. Parts that no face weighs are left out of the solve.

Batching: `PrdlRefiner.refine_batch` runs the whole solve for many faces at once on an array module
(NumPy, or CuPy on a GPU): visibility, cell grouping (one sort of packed keys for all faces), the stacked PRDL
descriptors, per-face Gauss-Newton matrices and batched LM solves. `refine` is a batch of one. On a CUDA device
`engine.refine_torch` runs the same solve in torch, captured in a CUDA graph (CuPy cannot capture its matrix
products). Timing: ``python -m engine.refine --bench-batch 64``.

Units: crop coordinates scaled so that the part-mask crop is 100 units wide, whatever its pixel size, so
the prior weights mean the same at any resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine import prdl
from engine.face_model import FaceModel
from engine.geometry import Camera
from engine.raster import face_labels

CROP_UNITS = 100.0
EYE_U, EYE_S = 17, 9  # eye-opening samples: positions along the lids (corners included) x blends between them
# Part weights for masks rasterised from the landmark network's contours. Left out: the eyes, because that
# contour does not close when the eyes do (a sliver stays open: on liveportrait_d3, eyes closed in frames
# 112-160, the mean eyeBlink was 0.39 with the eyes weighted against the regressor's 0.61), and the skin, whose
# outline (face oval, forehead cut at the brows) is drawn unlike the mesh's skin labels: with it PRDL opened the
# jaw to stretch the mesh's skin down to the oval (jawOpen median over frames 0-110 0.40 with skin, 0.17
# without, regressor 0.15) and raised the inner brows (browInnerUp median 0.29 vs 0.00). The brows, lips and
# nose remain. Synthetic masks (rendered from the mesh's own labels) use all parts.
LANDMARK_MASK_PART_WEIGHTS = (0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0)
MIN_CELL = 1.0  # crop units; about the mesh's vertex spacing at a typical crop


class CropGeometry(Protocol):
    """Where a frame's part-mask crop lies (engine.segmentation.PartMasks and CropFrame have it): the solve maps
    image pixels to crop units with it."""

    @property
    def size(self) -> int: ...

    def to_crop(self, xy_image) -> np.ndarray: ...


class PartMasks(CropGeometry, Protocol):
    """What target descriptors need of a segmentation result (engine.segmentation.PartMasks has it)."""

    def label_map(self) -> np.ndarray: ...


@dataclass
class RefineConfig:
    anchors: int = 6  # anchor grid n x n: per part around its target region (local), or over the crop
    local_anchors: bool = True  # one grid per part (small parts get as many anchors as the skin)
    anchor_margin: float = 0.35  # local grids extend this fraction of the part's size beyond it
    points: int = 80  # about this many points per part, target and prediction alike
    iterations: int = 3
    tolerance: float = 0.02  # stop once an iteration lowers the objective by less than this fraction
    prior: float = 1.0  # pull toward the regressor's expression, per unit weight^2
    temporal: float = 0.3  # pull toward the previous frame's refined expression
    damping: float = 0.3
    # damped steps tried per iteration until the objective drops (eval-prdl, 8x8 anchors: IoU 0.8617 with 2,
    # 0.8627 with 4)
    lm_trials: int = 2
    mean_anchor_stride: int = 2  # Gauss-Newton matrix of the mean-distance rows from every k-th anchor
    part_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    candidates: int = 16  # candidate surface samples per target point (before visibility and cell grouping)
    # min, max, mean descriptor weights: the paper weighs them equally; the nearest-point channel carries the
    # part boundaries, the farthest-point one is set by single extreme points (noisy) -- measured on eval-prdl
    channel_weights: tuple[float, float, float] = (3.0, 0.3, 1.0)
    refine_pose: bool = True  # False: expression only (pose held at the regressor's)


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
    masks: CropGeometry  # the PartMasks, or just where their crop lies (`engine.segmentation.CropFrame`)


def face_boundary_loops(faces: np.ndarray, n_vertices: int) -> list[np.ndarray]:
    """Ordered boundary loops of the mesh made of the triangles whose vertices are all < n_vertices."""
    f = np.asarray(faces)
    f = f[(f < n_vertices).all(1)]
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    uniq, cnt = np.unique(e, axis=0, return_counts=True)
    adj: dict[int, list[int]] = {}
    for a, b in uniq[cnt == 1]:
        adj.setdefault(int(a), []).append(int(b))
        adj.setdefault(int(b), []).append(int(a))
    seen, loops = set(), []
    for start in sorted(adj):
        if start in seen:
            continue
        loop, cur = [start], start
        seen.add(start)
        while True:
            nxt = [y for y in adj[cur] if y not in seen]
            if not nxt:
                break
            cur = nxt[0]
            seen.add(cur)
            loop.append(cur)
        loops.append(np.array(loop, np.int64))
    return loops


def _chain_points(chain: np.ndarray, layout: np.ndarray, us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points at arc-length fractions ``us`` along a vertex polyline: (idx (n, 2), weights (n, 2))."""
    seg = np.linalg.norm(np.diff(layout[chain], axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)]) / max(seg.sum(), 1e-12)
    i = np.clip(np.searchsorted(t, us, side="right") - 1, 0, len(chain) - 2)
    a = np.clip((us - t[i]) / np.maximum(t[i + 1] - t[i], 1e-12), 0.0, 1.0)
    return np.stack([chain[i], chain[i + 1]], 1), np.stack([1.0 - a, a], 1)


TRI_SUB = 2
TARGET_SUB = 2
EYE_VIS_TOL = 0.15
EYE_RING = 1  # the lids' front edge: this many vertex rings outward from the face surface's eye hole


def _ring(faces: np.ndarray, n_vertices: int, loop: np.ndarray, layout: np.ndarray, steps: int) -> np.ndarray:
    """The vertex ring ``steps`` edges outward from a boundary loop, ordered by angle around the loop's
    centre in ``layout`` (x, y)."""
    f = np.asarray(faces)
    f = f[(f < n_vertices).all(1)]
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    ring, seen = np.asarray(loop), set(int(v) for v in loop)
    for _ in range(steps):
        nxt = np.unique(e[np.isin(e[:, 0], ring), 1])
        ring = np.array([v for v in nxt if int(v) not in seen], np.int64)
        seen.update(int(v) for v in ring)
    c = layout[loop].mean(0)
    return ring[np.argsort(np.arctan2(layout[ring, 1] - c[1], layout[ring, 0] - c[0]))]


def eye_opening_samples(model: FaceModel, part: str, ring: int = EYE_RING) -> tuple[np.ndarray, np.ndarray]:
    """Samples filling one eye's opening: blends between the upper and lower lid edges at fixed positions
    along the lids.

    The lid edge is the vertex ring ``ring`` steps outward from the face surface's hole around that eyeball
    (the hole's own rim lies behind the lids' front edge, which is what bounds the visible eyeball; ring 1
    matches the rendered eye region best, IoU ~0.9 open to half-closed). The eyeball's own vertices do not
    move when the lids close (only their visibility changes, which has no gradient); the lid edges do.
    Returns (idx (n, 4), weights (n, 4)).
    """
    side = "left" if part.startswith("left") else "right"
    centre = model.neutral[model.eyeball_slices[side]].mean(0)
    loops = face_boundary_loops(model.faces, model.n_face_vertices)
    hole = min(loops, key=lambda lp: float(np.linalg.norm(model.neutral[lp].mean(0) - centre)))
    layout = np.asarray(model.neutral, np.float64)
    loop = _ring(model.faces, model.n_face_vertices, hole, layout[:, :2], ring) if ring else hole
    x = layout[loop, 0]
    i0, i1 = int(np.argmin(x)), int(np.argmax(x))
    rolled = np.roll(loop, -i0)
    k = (i1 - i0) % len(loop)
    c1, c2 = rolled[: k + 1], np.concatenate([rolled[k:], rolled[:1]])[::-1]  # both from corner i0 to i1
    upper, lower = (c1, c2) if layout[c1, 1].mean() > layout[c2, 1].mean() else (c2, c1)
    us = np.linspace(0.0, 1.0, EYE_U)[1:-1]
    iu, wu = _chain_points(upper, layout, us)
    il, wl = _chain_points(lower, layout, us)
    idx, w = [], []
    for s in np.linspace(0.0, 1.0, EYE_S):
        idx.append(np.concatenate([il, iu], 1))
        w.append(np.concatenate([(1.0 - s) * wl, s * wu], 1))
    for corner in ():
        idx.append(np.array([[corner] * 4]))
        w.append(np.array([[1.0, 0.0, 0.0, 0.0]]))
    return np.concatenate(idx), np.concatenate(w)


def surface_candidates(model: FaceModel, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate points of every part as fixed barycentric combinations of mesh vertices.

    Non-eye parts: the vertices and four interior points (centroid and three off-centre points) of every
    face-surface triangle carrying the part's label (the label a rasteriser gives the triangle), so the
    samples cover the part's rendered region evenly, thinned by farthest point sampling on the neutral
    frontal layout to ``budget``. Eyes: `eye_opening_samples`. Returns (idx (C, 4), weights (C, 4),
    part (C,)).
    """
    faces = np.asarray(model.faces)
    nf = model.n_face_vertices
    tri_lab = face_labels(faces, model.part_labels)
    layout = np.asarray(model.neutral[:, :2], np.float64)
    # centroids of the n x n sub-triangles of each triangle: an area-uniform sampling strictly inside it
    sub = TRI_SUB
    bary = []
    for i in range(sub):
        for j in range(sub - i):
            bary.append([(i + 1 / 3) / sub, (j + 1 / 3) / sub])
            if i + j < sub - 1:
                bary.append([(i + 2 / 3) / sub, (j + 2 / 3) / sub])
    bary = np.array([[a, b, 1.0 - a - b] for a, b in bary])
    all_idx, all_w, all_part = [], [], []
    for p, name in enumerate(model.part_names):
        if name in ("left_eye", "right_eye"):
            idx, w = eye_opening_samples(model, name)
        else:
            tri = faces[(tri_lab == p) & (faces < nf).all(1)]
            idx = np.repeat(tri, len(bary), 0)
            w = np.tile(bary, (len(tri), 1))
            idx = np.concatenate([idx, idx[:, :1]], 1)
            w = np.concatenate([w, np.zeros((len(w), 1))], 1)
            if len(idx) > budget:
                xy = np.einsum("ck,ckd->cd", w, layout[idx])
                sel = np.sort(prdl.farthest_point_sample(xy, budget, np, max_candidates=20000))
                idx, w = idx[sel], w[sel]
        all_idx.append(idx)
        all_w.append(w)
        all_part.append(np.full(len(idx), p))
    return (np.concatenate(all_idx).astype(np.int64), np.concatenate(all_w).astype(np.float64),
            np.concatenate(all_part).astype(np.int64))


def splat_visibility(xp, occ_uv, occ_z, uv, z, cell, size: float, tol):
    """(B, N) bool: points (uv (B, N, 2), depth z (B, N)) not hidden by a surface given as vertices
    (occ_uv (B, V, 2), occ_z (B, V)), per face.

    The occluders splat their depth into a grid of ``cell`` (B,)-sized cells over [0, size]^2 (nearest depth
    per cell); a point is visible when it lies in the grid and its depth is within ``tol`` (scalar or (N,)) of
    its cell's nearest depth (or the cell is empty). ``cell`` should be about the occluders' vertex spacing.
    One integer sort for all faces (cell, then depth quantised to 1/4096 cm); runs on NumPy and CuPy."""
    B = occ_uv.shape[0]
    G = int(np.ceil(size / float(cell.min()))) + 1
    cellb = cell[:, None]

    Gb = xp.ceil(size / cellb) + 1  # each face's own grid: a batch does not widen it

    def cells(q):
        gx = xp.floor(q[..., 0] / cellb)
        gy = xp.floor(q[..., 1] / cellb)
        ok = (gx >= 0) & (gx < Gb) & (gy >= 0) & (gy < Gb)
        key = (xp.arange(B)[:, None] * G + xp.where(ok, gy, 0).astype(xp.int64)) * G + xp.where(ok, gx, 0).astype(xp.int64)
        return ok, key

    ok_o, k_o = cells(occ_uv)
    ok_o &= xp.isfinite(occ_z)
    zmin = xp.where(ok_o, occ_z, xp.inf).min(1, keepdims=True)  # per face
    zmin = xp.where(xp.isfinite(zmin), zmin, 0.0)
    zbits = 20  # depth in 1/4096 cm steps over 256 cm behind the face's nearest vertex
    zq = xp.clip((occ_z - zmin) * 4096.0, 0, (1 << zbits) - 1).astype(xp.int64)
    # one sort of (cell, depth) keys: the first key of each cell holds its nearest depth
    sk = xp.sort(xp.where(ok_o, (k_o << zbits) + zq, B * G * G << zbits).reshape(-1))
    cell_of = sk >> zbits
    first = xp.ones(sk.shape[0], bool)
    first[1:] = cell_of[1:] != cell_of[:-1]
    first &= cell_of < B * G * G
    # nearest depth per cell; the other keys write to a spare last cell (no compaction, which on a GPU would read
    # a count back to the host)
    n_cells = B * G * G
    zb = xp.full(n_cells + 1, xp.inf)
    c = xp.where(first, cell_of, n_cells)
    zb[c] = zmin[xp.minimum(c // (G * G), B - 1), 0] + (sk & ((1 << zbits) - 1)) / 4096.0
    zb[n_cells] = xp.inf
    ok, k = cells(uv)
    return ok & (z <= zb[k] + tol)


class PrdlRefiner:
    def __init__(self, model: FaceModel, config: RefineConfig | None = None, fixed_exp: np.ndarray | None = None):
        self.model = model
        self.config = cfg = config or RefineConfig()
        self.pmax = int(1.5 * cfg.points)
        names = list(model.part_names)
        self.n_parts = len(names)
        # candidate points: fixed barycentric samples of each part's triangles (eyes: of the eye opening),
        # thinned once on the neutral face seen from the front to a few times the points a frame needs
        idx, w, part = surface_candidates(model, cfg.candidates * cfg.points)
        self.cand_idx, self.cand_w, self.cand_part = idx, w, part
        self.neutral = np.einsum("ck,ckd->cd", w, model.neutral[idx]).astype(np.float64)
        self.id_basis = np.einsum("ck,nckd->ncd", w, model.id_basis[:, idx]).astype(np.float64)
        exp_basis = np.einsum("ck,nckd->ncd", w, model.exp_basis[:, idx]).astype(np.float64)
        self.exp_basis = exp_basis
        self.exp_basis_nk = np.ascontiguousarray(exp_basis.transpose(1, 2, 0))  # (points, 3, 53) for gathers
        self.exp_flat = np.ascontiguousarray(exp_basis.reshape(len(exp_basis), -1))
        self.fixed_exp = np.zeros(model.n_exp, bool) if fixed_exp is None else np.asarray(fixed_exp, bool)
        nf = model.n_face_vertices
        self.face_neutral = np.asarray(model.neutral[:nf], np.float64)
        self.face_id_flat = np.ascontiguousarray(np.asarray(model.id_basis[:, :nf], np.float64).reshape(model.n_id, -1))
        self.id_flat = np.ascontiguousarray(self.id_basis.reshape(model.n_id, -1))
        self.face_exp = np.ascontiguousarray(np.asarray(model.exp_basis[:, :nf], np.float64).reshape(model.n_exp, -1))
        # float32 distance statistics: half the memory traffic of float64, ~1e-3 unit error (prdl.py)
        self.anchors_unit = prdl.anchor_grid(cfg.anchors, (0.0, 0.0, CROP_UNITS, CROP_UNITS), dtype=np.float32)
        self._id_cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._dev: dict[str, dict] = {}
        # depth tolerance of the visibility test (cm): eye-opening samples must not lie behind a lid that has
        # come down in front of them (closing lids overlap in depth more than in the image)
        eye_parts = [names.index(p) for p in ("left_eye", "right_eye")]
        self.vis_tol = np.where(np.isin(self.cand_part, eye_parts), EYE_VIS_TOL, 0.5)

    # ------------------------------------------------------------------ targets
    def targets(self, masks: PartMasks, part_weights: tuple[float, ...] | None = None) -> Targets:
        """Target descriptors of one frame's part masks.

        Each part's pixels are reduced to the centroids of the occupied cells of a square grid (cell chosen so
        that the part has about ``points`` cells); the prediction is reduced on the same grid the same way,
        so both sets are box-filtered samples of their regions with the same density. Parts whose weight in
        ``part_weights`` is 0 are left empty (the refinement leaves them out anyway; the skin is most pixels).
        """
        cfg = self.config
        labels = masks.label_map()
        k = CROP_UNITS / masks.size
        if part_weights is not None:
            keep = np.asarray(part_weights) != 0
            labels = np.where(keep[np.clip(labels, 0, None)] & (labels >= 0), labels, -1)
        rows, cols = np.nonzero(labels >= 0)
        part = labels[rows, cols].astype(np.int64)
        n_px = np.bincount(part, minlength=self.n_parts)
        # each pixel stands for its square (a rasterised region is the union of the squares whose centres it
        # covers, an unbiased picture of the region's extent): TARGET_SUB x TARGET_SUB points per pixel
        off = (np.arange(TARGET_SUB) + 0.5) / TARGET_SUB
        ox, oy = (a.reshape(-1) for a in np.meshgrid(off, off))
        xy = np.empty((len(rows) * len(ox), 2))
        xy[:, 0] = ((cols[:, None] + ox[None]) * k).reshape(-1)
        xy[:, 1] = ((rows[:, None] + oy[None]) * k).reshape(-1)
        part = np.repeat(part, len(ox))
        cells = np.maximum(np.sqrt(n_px * k * k / cfg.points), MIN_CELL)
        pts, mask, cells = cell_centroids(xy, part, cells, self.n_parts, self.pmax)
        if cfg.local_anchors:
            big = np.where(mask, 0.0, np.inf)[..., None]
            lo, hi = (pts + big).min(1), (pts - big).max(1)
            empty = ~mask.any(1)
            lo[empty], hi[empty] = 0.0, CROP_UNITS
            pad = cfg.anchor_margin * (hi - lo).max(1, keepdims=True) + 2.0
            anchors = anchor_grids(cfg.anchors, lo - pad, hi + pad)
        else:
            anchors = self.anchors_unit
        desc = prdl.part_descriptors(pts.astype(np.float32), mask, anchors, np)
        return Targets(desc.astype(np.float32), mask.any(1), cells, anchors, masks)

    # ------------------------------------------------------------------ geometry
    def _crop_affine(self, masks: CropGeometry) -> tuple[np.ndarray, np.ndarray]:
        """Image pixels -> crop units as x' = M x + b."""
        p = masks.to_crop(_ORIGIN_AND_UNITS)  # the images of (0, 0), (1, 0), (0, 1)
        k = CROP_UNITS / masks.size
        return (p[1:] - p[0]).T * k, (p[0] + 0.5) * k

    def prepare_identity(self, identity: np.ndarray) -> None:
        """Compute an identity's shapes ahead of its frames (tracking holds the identity: done once per person)."""
        self._identity_bases(identity)

    def _identity_bases(self, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate and face-surface neutral shapes for an identity (cached: identity is held while tracking)."""
        key = np.asarray(identity, np.float64).tobytes()
        hit = self._id_cache.get(key)
        if hit is None:
            ident = np.asarray(identity, np.float64)
            hit = ((self.neutral + (ident @ self.id_flat).reshape(-1, 3)).astype(np.float32),
                   (self.face_neutral + (ident @ self.face_id_flat).reshape(-1, 3)).astype(np.float32))
            if len(self._id_cache) > 64:
                self._id_cache.clear()
            self._id_cache[key] = hit
        return hit

    def constant_arrays(self, parts: tuple[int, ...], identity_bases: bool = True) -> dict[str, np.ndarray]:
        """The refiner's constant arrays for the candidates of ``parts`` (a part that no face weighs is left out
        of the whole solve); with ``identity_bases`` the neutral shapes and identity bases as well (NumPy takes
        identity shapes from the host cache instead, `_identity_bases`)."""
        free = np.nonzero(~self.fixed_exp)[0]
        sub = np.nonzero(np.isin(self.cand_part, parts))[0]
        C, n_exp, n_id = len(sub), self.model.n_exp, self.model.n_id
        renumber = np.full(self.n_parts, -1, np.int64)
        renumber[list(parts)] = np.arange(len(parts))
        host = {"cand_sub": sub, "cand_part": renumber[self.cand_part[sub]],
                "exp_flat": self.exp_flat.reshape(n_exp, -1, 3)[:, sub].reshape(n_exp, -1).astype(np.float32),
                "free_idx": free,
                "basis_free": np.ascontiguousarray(self.exp_basis_nk[sub][:, :, free], np.float32).reshape(C, -1),
                "face_exp": self.face_exp.astype(np.float32), "vis_tol": self.vis_tol[sub]}
        if identity_bases:
            host.update({"neutral": self.neutral[sub], "face_neutral": self.face_neutral,
                         "id_flat": self.id_flat.reshape(n_id, -1, 3)[:, sub].reshape(n_id, -1),
                         "face_id_flat": self.face_id_flat})
        return host

    def _device_arrays(self, xp, parts: tuple[int, ...]) -> dict:
        """`constant_arrays` on ``xp`` (uploaded once per array module and part set)."""
        key = (xp.__name__, parts)
        if key not in self._dev:
            if len(self._dev) >= 8:  # a handful of part sets in use at once (all parts, landmark masks, ...)
                self._dev.clear()
            self._dev[key] = {k: xp.asarray(v) for k, v in self.constant_arrays(parts, xp is not np).items()}
        return self._dev[key]

    # ------------------------------------------------------------------ refinement
    def refine(self, targets: Targets, camera: Camera, rotation_cam: np.ndarray, translation: np.ndarray,
               expression: np.ndarray, identity: np.ndarray, *, exp_prior: np.ndarray | None = None,
               exp_prev: np.ndarray | None = None, part_weights: tuple[float, ...] | None = None) -> RefineResult:
        """Refine one face (the batched solver with a batch of one)."""
        return self.refine_batch([RefineProblem(targets, camera, rotation_cam, translation, expression, identity,
                                                exp_prior, exp_prev, part_weights)])[0]

    def batch_inputs(self, problems: list["RefineProblem"]) -> "BatchInputs":
        """The host side of a batch: a few small arrays per face (targets come prepared by `targets`), and the
        parts that some face weighs (the others are left out of the whole solve)."""
        cfg = self.config
        n_e = self.model.n_exp
        aff = np.empty((len(problems), 6))
        for i, pr in enumerate(problems):
            m, b = self._crop_affine(pr.targets.masks)
            aff[i, :4], aff[i, 4:] = m.reshape(-1), b
        cam = [(pr.camera.fx, pr.camera.fy, pr.camera.cx, pr.camera.cy) for pr in problems]
        e0 = np.clip(np.array([pr.expression for pr in problems], np.float64), 0.0, 1.0)
        prior = np.array([e if pr.exp_prior is None else pr.exp_prior for e, pr in zip(e0, problems)], np.float64)
        zeros = np.zeros(n_e)
        prev = np.array([zeros if pr.exp_prev is None else pr.exp_prev for pr in problems], np.float64)
        has_prev = [pr.exp_prev is not None for pr in problems]
        pw = np.stack([np.asarray(cfg.part_weights if pr.part_weights is None else pr.part_weights, np.float32)
                       for pr in problems])
        parts = tuple(int(p) for p in np.nonzero((pw != 0).any(0))[0])  # parts some face weighs
        if not parts:
            parts = (0,)  # nothing weighed: a solve that only the prior moves
        sel = list(parts)
        A = max(int(pr.targets.anchors.shape[-2]) for pr in problems)
        return BatchInputs(
            parts, aff, np.array(cam, np.float64), e0, prior, prev,
            cfg.temporal * np.array(has_prev, np.float64)[:, None],
            np.array([pr.rotation_cam for pr in problems], np.float64),
            np.array([pr.translation for pr in problems], np.float64),
            np.array([pr.identity for pr in problems], np.float64),
            np.stack([a if a.shape == (self.n_parts, A, 2) else np.broadcast_to(a, (self.n_parts, A, 2))
                      for a in (pr.targets.anchors for pr in problems)])[:, sel].astype(np.float32),
            np.stack([pr.targets.desc for pr in problems])[:, sel].astype(np.float32),
            np.stack([pr.targets.valid for pr in problems])[:, sel],
            np.stack([pr.targets.cells for pr in problems])[:, sel].astype(np.float64),
            pw[:, sel])

    def results(self, inp: "BatchInputs", rotation_cam, translation, expression, loss_before, loss_after,
                iterations, used) -> list[RefineResult]:
        """Per-face results from the batch's host arrays (``used`` (B, q): the parts of ``inp.parts`` used)."""
        full = np.zeros((len(expression), self.n_parts), bool)
        full[:, list(inp.parts)] = used
        return [RefineResult(rotation_cam[i], translation[i], expression[i], float(loss_before[i]),
                             float(loss_after[i]), int(iterations[i]), [bool(u) for u in full[i]])
                for i in range(len(expression))]

    def refine_batch(self, problems: list["RefineProblem"], xp=None) -> list[RefineResult]:
        """Levenberg-Marquardt refinement of many faces at once, written against the array module ``xp``
        (NumPy, or CuPy on a GPU: the per-face preparation -- visibility, crop affine -- runs in NumPy, the
        iterations run on ``xp`` arrays, batched over faces: one sort for the point selection of all faces,
        one stacked PRDL evaluation, batched normal equations and solves)."""
        xp = np if xp is None else xp
        cfg = self.config
        B = len(problems)
        if B == 0:
            return []
        pm = self.pmax
        inp = self.batch_inputs(problems)
        parts = inp.parts
        q = len(parts)
        A = inp.anchors.shape[2]
        asx = xp.asarray
        dev = self._device_arrays(xp, parts)
        aff, cam, E, P0, Pv = (asx(a) for a in (inp.aff, inp.cam, inp.expression, inp.prior, inp.prev))
        tw = asx(inp.temporal)
        RC, T = asx(inp.rotation_cam), asx(inp.translation)
        anchors, tdesc = asx(inp.anchors.reshape(B * q, A, 2)), asx(inp.target_desc.reshape(B * q, A, 3))
        tvalid, cells = asx(inp.target_valid.reshape(-1)), asx(inp.cells)
        weights = asx(inp.part_weights.reshape(-1))
        free = asx(~self.fixed_exp)
        chw = asx(np.asarray(cfg.channel_weights, np.float32))
        cand_part, exp_flat, basis_c = dev["cand_part"], dev["exp_flat"], dev["basis_free"]
        C = int(cand_part.shape[0])
        fi = dev["free_idx"]
        nf = int(fi.shape[0])
        n = 6 + nf
        # identity-dependent shapes (cached on the host while tracking one person), then visibility
        if xp is np:  # per face from the identity cache (tracking holds each person's identity)
            hit = [self._identity_bases(ident) for ident in inp.identity]
            base = np.stack([b[dev["cand_sub"]] for b, _ in hit])
            face_base = np.stack([f for _, f in hit])
        else:
            ident = asx(inp.identity)
            base = (dev["neutral"] + (ident @ dev["id_flat"]).reshape(B, C, 3)).astype(xp.float32)
            face_base = (dev["face_neutral"] + (ident @ dev["face_id_flat"]).reshape(B, -1, 3)).astype(xp.float32)
        rc0, t0 = RC.copy(), T.copy()

        cam32, aff32 = cam.astype(xp.float32)[:, None], aff.astype(xp.float32)[:, None]

        def project(Xs, RC_, T_):
            """Model points (B, S, 3) -> crop points (B, S, 2), camera points (B, S, 3), in float32 (1e-5 crop
            units, a few nm on the face: far below what the masks resolve, half the memory traffic)."""
            pc = xp.matmul(Xs, RC_.transpose(0, 2, 1).astype(xp.float32))
            pc += T_.astype(xp.float32)[:, None, :]
            iz = 1.0 / pc[..., 2]
            u = cam32[..., 0] * pc[..., 0] * iz + cam32[..., 2]
            v = cam32[..., 1] * pc[..., 1] * iz + cam32[..., 3]
            out = xp.empty(pc.shape[:2] + (2,), xp.float32)
            out[..., 0] = aff32[..., 0] * u + aff32[..., 1] * v + aff32[..., 4]
            out[..., 1] = aff32[..., 2] * u + aff32[..., 3] * v + aff32[..., 5]
            return out, pc

        vis_c = None  # NumPy, once visibility is known: (B * Cv,) flat b*C + c of the candidates evaluations use

        def candidates(E_, RC_, T_):
            """Crop points (B, C', 2) and camera points (B, C', 3) of the candidates: all of them, or ``vis_c``."""
            # one (1, n_exp) product per face: the same rounding in any batch; f32: ~1e-5 cm
            X = base + (E_.astype(xp.float32)[:, None, :] @ exp_flat)[:, 0].reshape(base.shape)
            return project(X if vis_c is None else X.reshape(-1, 3).take(vis_c, 0).reshape(B, -1, 3), RC_, T_)

        def prior_cost(E_):
            d = (E_ - P0) * free
            dp = (E_ - Pv) * free
            return cfg.prior * (d * d).sum(1) + (tw[:, 0] * (dp * dp).sum(1))

        def evaluate(E_, RC_, T_, projected=None, gradient=True):
            """Everything an iteration needs at one parameter state: the candidates' projection, their cell
            grouping (re-selected at every state: cells follow the moving points), the predicted points and the
            PRDL loss with (``gradient``) its residuals' point Jacobian terms."""
            uvc_, pcc_ = candidates(E_, RC_, T_) if projected is None else projected
            sel_ = select_cells(xp, uvc_, visible, eval_part, cells, q, pm)
            # slots fill from 0 in every part: the first pe_ suffice (NumPy; elsewhere finding pe_ would be a
            # device synchronisation per evaluation, and the GPU does not mind the empty slots)
            pe_ = max(int(sel_.mask.sum(1).max()), 1) if xp is np else pm
            uv_ = sel_.means(xp, uvc_.reshape(-1, 2)).reshape(B, q, pm, 2)[:, :, :pe_]
            uv_ = uv_.reshape(B * q, pe_, 2).astype(xp.float32)
            smask = sel_.mask[:, :pe_]
            if gradient:
                terms_ = prdl.gauss_newton_terms(uv_, smask, tdesc, anchors, weights, target_valid=tvalid,
                                                 channel_weights=chw, xp=xp)
                r = terms_.residuals
            else:  # the last trials: only their loss decides
                terms_ = None
                r = prdl.weighted_residuals(uv_, smask, tdesc, anchors, weights, target_valid=tvalid,
                                            channel_weights=chw, xp=xp)
            r = xp.asarray(r, xp.float64).reshape(B, -1)
            return _State(pcc_, sel_, pe_, terms_, (r * r).sum(1))

        uvc, pcc = candidates(E, RC, T)
        # visibility, once per call: each candidate's depth against a point-splat z-buffer of the face surface
        face = face_base + (E.astype(xp.float32)[:, None, :] @ dev["face_exp"])[:, 0].reshape(face_base.shape)
        face_uv, face_pc = project(face, RC, T)
        px_per_cm = xp.sqrt(aff[:, 0] ** 2 + aff[:, 2] ** 2) * cam[:, 0] / xp.maximum(T[:, 2], 1e-3)
        splat = xp.maximum(0.3 * px_per_cm, 0.5)  # about the mesh's vertex spacing
        visible = splat_visibility(xp, face_uv, face_pc[..., 2], uvc, pcc[..., 2], splat, CROP_UNITS, dev["vis_tol"])
        eval_part = cand_part[None]
        if xp is np:  # the evaluations keep only the visible candidates (about 2/3), in order, padded to the most
            # visible per face with hidden ones (which select_cells leaves out)
            keep = np.argsort(~visible, axis=1, kind="stable")[:, :max(int(visible.sum(1).max()), 1)]
            vis_c = (np.arange(B)[:, None] * C + keep).reshape(-1)  # flat b*C + c
            uvc, pcc = (a.reshape(B * C, -1).take(vis_c, 0).reshape(B, len(vis_c) // B, -1) for a in (uvc, pcc))
            visible = visible.reshape(-1).take(vis_c).reshape(B, -1)
            eval_part = cand_part.take(keep)
        cand_of = (lambda r: vis_c[r] % C) if vis_c is not None else (lambda r: r % C)  # slot rep -> candidate
        st = evaluate(E, RC, T, (uvc, pcc))
        loss_before = st.loss
        lam = xp.full(B, cfg.damping)
        alive = xp.ones(B, bool)
        iters = np.zeros(B, np.int64)
        eye = xp.eye(n)
        for it in range(1, cfg.iterations + 1):
            pe = st.pe
            # Jacobian of each cell's mean from its representative (the member nearest the cell centre)
            rep = st.sel.rep.reshape(B * q, pm)[:, :pe].reshape(-1)
            sbasis = basis_c[cand_of(rep)].reshape(B, q * pe, 3, nf)
            pc_rep = st.pcc.reshape(-1, 3)[rep].reshape(B, q * pe, 3)
            jtr = slot_gradient(xp, st.terms.grad.reshape(B, q * pe, 2), pc_rep, T, RC, sbasis, cam, aff)
            if it == 1:  # later iterations keep this Gauss-Newton matrix and take a fresh gradient
                jac = slot_jacobian(xp, pc_rep, T, RC, sbasis, cam, aff)  # (B, q*pe, 2, n)
                jtj0 = batched_normal_equations(jac.reshape(B * q, pe, 2, n), st.terms, B,
                                                mean_anchor_stride=cfg.mean_anchor_stride)
                jtj0 = jtj0.astype(xp.float64)
            total = st.loss + prior_cost(E)
            jtj = jtj0.copy()
            Ef = E[:, fi]
            diag = (cfg.prior + tw) * xp.ones((B, nf))
            jtr[:, 6:] += cfg.prior * (Ef - P0[:, fi]) + tw * (Ef - Pv[:, fi])
            jtj[:, 6:, 6:] += diag[:, :, None] * eye[6:, 6:]
            act = xp.full((B, n), True)
            act[:, :6] = bool(cfg.refine_pose)
            act[:, 6:] = ~(((Ef <= 0.0) & (jtr[:, 6:] > 0)) | ((Ef >= 1.0) & (jtr[:, 6:] < 0)))
            actf = act.astype(xp.float64)
            hh = jtj * actf[:, :, None] * actf[:, None, :]
            hdiag = xp.diagonal(hh, axis1=1, axis2=2)
            pending = alive.copy()
            moved = xp.zeros(B, bool)
            for _ in range(cfg.lm_trials):  # Levenberg-Marquardt: shrink the step until the objective drops
                h = hh + eye * (lam[:, None] * (hdiag + 1e-6) + (1.0 - actf))[:, None, :]
                delta = -xp.linalg.solve(h, (jtr * actf)[..., None])[..., 0]
                delta *= pending[:, None]  # faces that are not trying a step are evaluated where they are
                RCn = batched_rodrigues(xp, delta[:, :3]) @ RC
                Tn = T + delta[:, 3:6]
                En = E.copy()
                En[:, fi] = xp.clip(E[:, fi] + delta[:, 6:], 0.0, 1.0)  # E: a face that took a step has moved
                trial = evaluate(En, RCn, Tn, gradient=it < cfg.iterations)  # loss with its own cell selection
                ok = pending & (trial.loss + prior_cost(En) < total)
                RC = xp.where(ok[:, None, None], RCn, RC)
                T = xp.where(ok[:, None], Tn, T)
                E = xp.where(ok[:, None], En, E)
                lam = xp.where(ok, xp.maximum(lam * 0.3, 1e-4), xp.where(pending, lam * 10.0, lam))
                moved |= ok
                pending = pending & ~ok
                if not bool(pending.any()):
                    break
            # every face's last evaluation is its state, unless it ended on a rejected step; where no face moved,
            # ``st`` still is every face's state
            if bool(pending.any()) and bool(moved.any()):
                st = evaluate(E, RC, T, gradient=it < cfg.iterations)
            elif not bool(pending.any()):
                st = trial
            iters += _host(alive).astype(np.int64)
            # a face is done when no step improves it, or when the last one gained less than ``tolerance``
            converged = (total - (st.loss + prior_cost(E))) < cfg.tolerance * total
            alive = alive & ~pending & ~converged
            if not bool(alive.any()):
                break
        loss_after, sel = st.loss, st.sel
        used = _host((tvalid & sel.mask.any(1) & (weights != 0)).reshape(B, q))
        worse = loss_after > loss_before  # (the prior can trade a little PRDL loss): never worse than the start
        RC = xp.where(worse[:, None, None], rc0, RC)
        T = xp.where(worse[:, None], t0, T)
        E = xp.where(worse[:, None], asx(inp.expression), E)
        loss_after = xp.where(worse, loss_before, loss_after)
        return self.results(inp, *(_host(a) for a in (RC, T, E, loss_before, loss_after)), iters, used)


@dataclass
class _State:
    """One parameter state's evaluation inside `PrdlRefiner.refine_batch`."""

    pcc: object  # (B, C, 3) camera points of the evaluated candidates (NumPy: the visible ones, padded)
    sel: CellSelection
    pe: int  # slots used per part
    terms: prdl.GNTerms | None  # None after the last iteration (only the loss is needed)
    loss: object  # (B,) PRDL loss


@dataclass
class RefineProblem:
    """One face of a batched refinement."""

    targets: Targets
    camera: Camera
    rotation_cam: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    identity: np.ndarray
    exp_prior: np.ndarray | None = None
    exp_prev: np.ndarray | None = None
    part_weights: tuple[float, ...] | None = None  # None: the refiner's config


@dataclass
class BatchInputs:
    """`PrdlRefiner.batch_inputs`: a batch's host arrays, face-major (B leading), per part for ``parts``."""

    parts: tuple[int, ...]  # the parts some face weighs, in order (q of them)
    aff: np.ndarray  # (B, 6) image pixels -> crop units: M (row-major) and b
    cam: np.ndarray  # (B, 4) fx, fy, cx, cy
    expression: np.ndarray  # (B, n_exp) the start, clipped to [0, 1]
    prior: np.ndarray  # (B, n_exp) the regressor's answer
    prev: np.ndarray  # (B, n_exp) the previous frame's refined expression (zeros where none)
    temporal: np.ndarray  # (B, 1) the temporal weight (0 where there is no previous frame)
    rotation_cam: np.ndarray  # (B, 3, 3)
    translation: np.ndarray  # (B, 3)
    identity: np.ndarray  # (B, n_id)
    anchors: np.ndarray  # (B, q, A, 2) float32
    target_desc: np.ndarray  # (B, q, A, 3) float32
    target_valid: np.ndarray  # (B, q) bool
    cells: np.ndarray  # (B, q) thinning grid cell per part, crop units
    part_weights: np.ndarray  # (B, q) float32

    def solve_arrays(self) -> list[np.ndarray]:
        """The arrays a device solve takes, in `engine.refine_torch.TorchRefiner._solve`'s order."""
        return [self.aff, self.cam, self.expression, self.prior, self.prev, self.temporal, self.rotation_cam,
                self.translation, self.identity, self.anchors, self.target_desc, self.target_valid, self.cells,
                self.part_weights]


_ORIGIN_AND_UNITS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def anchor_grids(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(parts, n*n, 2) float32 cell-centre anchors of one n x n grid per box (lo (parts, 2), hi (parts, 2))."""
    f = (np.arange(n) + 0.5) / n
    xs = lo[:, 0:1] + f[None] * (hi[:, 0:1] - lo[:, 0:1])  # (parts, n)
    ys = lo[:, 1:2] + f[None] * (hi[:, 1:2] - lo[:, 1:2])
    gx = np.broadcast_to(xs[:, None, :], (len(lo), n, n))
    gy = np.broadcast_to(ys[:, :, None], (len(lo), n, n))
    return np.stack([gx.reshape(len(lo), -1), gy.reshape(len(lo), -1)], -1).astype(np.float32)


def cell_centroids(xy: np.ndarray, part: np.ndarray, cells: np.ndarray, n_parts: int, pmax: int):
    """Centroids of the occupied cells of each part's grid (cell size ``cells[part]``, origin 0), for points
    with non-negative coordinates below 4096 cells (crop units).

    Returns (points (n_parts, pmax, 2), mask (n_parts, pmax), cells (n_parts,)); a part with more than ``pmax``
    occupied cells gets a coarser cell (returned in ``cells``). One sort of packed (part, cell y, cell x, index)
    keys, then sums over the runs of equal cells."""
    cells = np.asarray(cells, np.float64).copy()
    x, y = np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])
    ib = max(len(x) - 1, 1).bit_length()
    while True:
        inv = 1.0 / cells[part]
        gx = np.minimum((x * inv).astype(np.int64), 4095)
        gy = np.minimum((y * inv).astype(np.int64), 4095)
        skey = np.sort((((part << 24) | (gy << 12) | gx) << ib) | np.arange(len(x)))
        cell = skey >> ib
        starts = np.flatnonzero(np.concatenate([[True], cell[1:] != cell[:-1]])) if len(cell) else np.zeros(0, int)
        gpart = cell[starts] >> 24
        per = np.bincount(gpart, minlength=n_parts)
        over = per > pmax
        if not over.any():
            break
        cells[over] *= np.sqrt(per[over] / pmax) * 1.05
    order = skey & ((1 << ib) - 1)
    n = np.diff(np.append(starts, len(order)))
    sx = np.add.reduceat(x[order], starts) if len(starts) else np.zeros(0)
    sy = np.add.reduceat(y[order], starts) if len(starts) else np.zeros(0)
    rank = np.arange(len(starts)) - (np.cumsum(per) - per)[gpart]
    pts = np.zeros((n_parts, pmax, 2))
    mask = np.zeros((n_parts, pmax), bool)
    pts[gpart, rank, 0] = sx / n
    pts[gpart, rank, 1] = sy / n
    mask[gpart, rank] = True
    return pts, mask, cells


def select_cells(xp, uv, visible, cand_part, cells, q: int, pm: int):
    """Batched cell grouping of predicted points (the prediction's side of `cell_centroids`).

    uv (B, C, 2) crop points of the candidates, visible (B, C), cand_part (C,) or (B, C), cells (B, q). The visible
    candidates of each (face, part) are grouped by grid cell; each group is one predicted point, the mean of
    its members. Returns a `CellSelection`. Groups beyond ``pm`` per part are dropped (cell sizes are chosen so
    that this is rare).

    One sort of packed keys for all faces, then cumulative sums and scatters. NumPy compacts the arrays to the
    visible candidates and the groups (its reduceat needs them contiguous); other array modules (CuPy) keep
    every array at its full length and send what is dropped to a spare last slot, so that nothing is read back
    to the host: no device synchronisation."""
    B, C, _ = uv.shape
    H = 512  # cells per axis either side of 0: keys hold cell x and y in 10 bits each
    fp = xp.arange(B)[:, None] * q + cand_part.reshape(-1, C)  # flat (face, part)
    inv = (1.0 / xp.take(cells.reshape(-1), fp)).astype(uv.dtype)  # (B, C)
    fx, fy = uv[..., 0] * inv, uv[..., 1] * inv  # in cells (planar: interleaved-axis ops are slow in NumPy)
    gx, gy = xp.floor(fx), xp.floor(fy)
    ok = visible & (gx >= -H) & (gx < H) & (gy >= -H) & (gy < H)
    fx -= gx + 0.5
    fy -= gy + 0.5
    dq = xp.where(ok, xp.minimum((fx * fx + fy * fy) * 2048.0, 1023.0), 0.0).astype(xp.int64)  # 10 bits
    gx = (gx + H).astype(xp.int64) & 1023
    gy = (gy + H).astype(xp.int64) & 1023
    # key = face-part | cell y | cell x | distance to the cell centre | candidate index in its face: unique,
    # so a plain sort (much faster than a stable argsort) gives the same order in any batch
    cbits = max(C - 1, 1).bit_length()
    big = B * q
    if ((big + 1) << (30 + cbits)).bit_length() > 63:
        raise ValueError(f"select_cells: a batch of {B} faces x {C} candidates overflows the 64-bit sort keys")
    cell = (xp.where(ok, fp, big) << 20) | (gy << 10) | gx
    skey = xp.sort(((((cell << 10) | dq) << cbits) | xp.arange(C)[None, :]).reshape(-1))
    S = B * q * pm
    compact = xp is np
    if compact:
        skey = skey[:int(ok.sum())]  # hidden candidates sort last
    sk = skey >> (10 + cbits)  # cell
    gpart_m = sk >> 20  # (face, part) of each candidate; ``big`` for a hidden one
    order = (xp.minimum(gpart_m, big - 1) // q) * C + (skey & ((1 << cbits) - 1))  # flat candidate b*C + c
    new = gpart_m < big
    new[1:] &= sk[1:] != sk[:-1]
    gid = xp.cumsum(new) - 1  # group of each candidate
    if compact:
        first = xp.nonzero(new)[0]  # each group's first candidate
        gpart = gpart_m[first]
    else:  # groups at their full possible count (one per candidate) + a spare slot for the rest
        n = len(sk)
        gi = xp.where(new, gid, n)
        first = xp.zeros(n + 1, xp.int64)
        first[gi] = xp.arange(n)
        gpart = xp.full(n + 1, big, xp.int64)
        gpart[gi] = gpart_m
        gpart[n] = big
    cnt = prdl.bincount(xp, gpart, None, big + 1)[:big]  # groups per (face, part)
    rank = xp.arange(len(gpart)) - (xp.cumsum(cnt) - cnt)[xp.minimum(gpart, big - 1)]  # groups of a part are adjacent
    keep_g = (gpart < big) & (rank < pm)
    slot_g = xp.where(keep_g, gpart * pm + rank, S)  # S: dropped
    slot = slot_g[gid] if compact else xp.where(gpart_m < big, slot_g[gid], S)
    if compact:
        keep_m = slot < S
        member, slot = order[keep_m], slot[keep_m]
        gslot = slot_g[keep_g]
    else:
        member, gslot = order, None
    count = prdl.bincount(xp, slot, None, S + 1)[:S]
    rep = xp.zeros(S + 1, xp.int64)
    rep[slot_g] = order[first[:len(slot_g)] if compact else first]  # the first member: nearest the centre
    gstart = None
    if compact:
        gcount = count[gslot]
        gstart = xp.cumsum(gcount) - gcount  # each kept group's first position in ``member``
    return CellSelection(member, slot, count, rep[:S], (count > 0).reshape(B * q, pm), gstart, gslot)


@dataclass
class CellSelection:
    """`select_cells`'s grouping of candidates into predicted points (slots (face, part, k), flat)."""

    member: object  # (M,) flat candidate index b*C + c of each member
    slot: object  # (M,) its slot (B*q*pm: dropped, on the array modules that do not compact)
    count: object  # (B*q*pm,) members per slot
    rep: object  # (B*q*pm,) the member nearest the cell's centre (flat candidate index)
    mask: object  # (B*q, pm) slots in use
    gstart: object  # NumPy: (G,) each kept group's first position in ``member`` (groups are contiguous there)
    gslot: object  # NumPy: (G,) each kept group's slot

    def means(self, xp, values):
        """Per-slot means (B*q*pm, d) of candidate values (B*C, d): NumPy sums the contiguous runs with
        reduceat (several times faster than a weighted bincount); elsewhere a scatter-add with a spare slot."""
        S = len(self.count)
        out = xp.zeros((S, values.shape[1]))
        n = xp.maximum(self.count, 1)
        for k in range(values.shape[1]):
            v = values[:, k][self.member]
            if xp is np:
                if len(self.gstart):  # no member at all: every candidate hidden or off the crop
                    out[self.gslot, k] = np.add.reduceat(v.astype(np.float64), self.gstart) / n[self.gslot]
            else:
                out[:, k] = prdl.bincount(xp, self.slot, v.astype(xp.float64), S + 1)[:S] / n
        return out


def _projection_rows(xp, pc, cam, aff):
    """d(crop x, crop y)/d(camera point) (B, S, 2, 3) of points ``pc`` (B, S, 3)."""
    iz = 1.0 / pc[..., 2]
    fx, fy = cam[:, None, 0] * iz, cam[:, None, 1] * iz
    a = xp.empty(pc.shape[:2] + (2, 3), pc.dtype)
    for i in range(2):
        m0, m1 = aff[:, None, 2 * i], aff[:, None, 2 * i + 1]  # crop_i = m0 u + m1 v + b_i
        a[:, :, i, 0] = m0 * fx
        a[:, :, i, 1] = m1 * fy
        a[:, :, i, 2] = -(a[:, :, i, 0] * pc[..., 0] + a[:, :, i, 1] * pc[..., 1]) * iz
    return a


def _cross(xp, r, a):
    """r x a for r (..., 3) broadcast against a (..., k, 3)."""
    out = xp.empty(a.shape, a.dtype)
    out[..., 0] = r[..., 1] * a[..., 2] - r[..., 2] * a[..., 1]
    out[..., 1] = r[..., 2] * a[..., 0] - r[..., 0] * a[..., 2]
    out[..., 2] = r[..., 0] * a[..., 1] - r[..., 1] * a[..., 0]
    return out


def slot_jacobian(xp, pc, T, RC, sbasis, cam, aff):
    """d(crop point)/d(rotation increment, translation, expression) (B, S, 2, 6 + n_e) of points whose camera
    coordinates are ``pc`` (B, S, 3) = RC (model point) + T and whose expression deltas are ``sbasis``
    (B, S, 3, n_e), in ``sbasis``'s dtype. Rotation increments are left-multiplied, d(pc) = w x (pc - T), so
    row i of the rotation block is (pc - T) x a_i with a_i = d(crop_i)/d(pc); the expression block is
    (RC^T a_i) . basis."""
    B, S = pc.shape[:2]
    dt = sbasis.dtype
    a = _projection_rows(xp, pc, cam, aff)  # (B, S, 2, 3)
    out = xp.empty((B, S, 2, 6 + sbasis.shape[-1]), dt)
    out[..., :3] = _cross(xp, (pc - T[:, None, :])[:, :, None, :], a)
    out[..., 3:6] = a
    ra = xp.matmul(a.reshape(B, S * 2, 3), RC).reshape(B, S, 2, 3).astype(dt)  # RC^T a per row
    out[..., 6:] = xp.matmul(ra, sbasis)
    return out


def slot_gradient(xp, grad, pc, T, RC, sbasis, cam, aff):
    """J^T r (B, 6 + n_e) of the slot Jacobian of `slot_jacobian` contracted with the loss gradient ``grad``
    (B, S, 2) (= 2 J_point^T r), without forming the Jacobian: each point's 2D gradient becomes one camera-space
    vector w = sum_i grad_i a_i, then rotation sum (pc - T) x w, translation sum w, expression
    sum (RC^T w) . basis."""
    B = pc.shape[0]
    a = _projection_rows(xp, pc, cam, aff)
    w = (grad[..., 0, None] * a[:, :, 0] + grad[..., 1, None] * a[:, :, 1])  # (B, S, 3)
    m = xp.matmul((pc - T[:, None, :]).transpose(0, 2, 1), w)  # sum of r w^T: its antisymmetric part is sum r x w
    out = xp.empty((B, 6 + sbasis.shape[-1]))
    out[:, 0], out[:, 1], out[:, 2] = m[:, 1, 2] - m[:, 2, 1], m[:, 2, 0] - m[:, 0, 2], m[:, 0, 1] - m[:, 1, 0]
    out[:, 3:6] = w.sum(1)
    rw = xp.matmul(w, RC).astype(sbasis.dtype)  # (B, S, 3): RC^T w per point
    out[:, 6:] = xp.matmul(rw.reshape(B, 1, -1), sbasis.reshape(B, -1, sbasis.shape[-1]))[:, 0]
    return 0.5 * out


def batched_rodrigues(xp, w):
    """(B, 3) axis-angle vectors -> (B, 3, 3) rotation matrices."""
    theta = xp.sqrt((w * w).sum(1))
    k = w / xp.maximum(theta, 1e-12)[:, None]
    K = xp.zeros((len(w), 3, 3))
    K[:, 0, 1], K[:, 0, 2] = -k[:, 2], k[:, 1]
    K[:, 1, 0], K[:, 1, 2] = k[:, 2], -k[:, 0]
    K[:, 2, 0], K[:, 2, 1] = -k[:, 1], k[:, 0]
    s, c = xp.sin(theta)[:, None, None], xp.cos(theta)[:, None, None]
    return xp.eye(3)[None] + s * K + (1.0 - c) * (K @ K)


def batched_normal_equations(points_jac, terms, n_faces: int, *, mean_anchor_stride: int = 1):
    """Per-face J^T J (B, n, n) of stacked faces (parts = faces x parts per face, in order); J^T r comes from
    `slot_gradient`, which does not need the Jacobian.

    Same construction as `prdl.normal_equations` (min/max rows summed per point as G^T S G, mean rows formed
    per part as (A, n) blocks, optionally from every s-th anchor), kept per face."""
    xp = prdl.get_array_module(points_jac, terms.grad)
    dt = points_jac.dtype
    parts, na, pm = terms.shape
    B = int(n_faces)
    q = parts // B
    n = points_jac.shape[-1]
    G = points_jac * terms.mask[..., None, None]
    Gb = G.reshape(B, q * pm, 2, n)
    flat = (terms.index + (xp.arange(parts) * pm)[:, None, None]).reshape(-1)
    u = terms.unit.reshape(-1, 2).astype(dt)
    nv = parts * pm
    sxx = prdl.bincount(xp, flat, u[:, 0] * u[:, 0], nv).astype(dt).reshape(B, q * pm, 1)
    sxy = prdl.bincount(xp, flat, u[:, 0] * u[:, 1], nv).astype(dt).reshape(B, q * pm, 1)
    syy = prdl.bincount(xp, flat, u[:, 1] * u[:, 1], nv).astype(dt).reshape(B, q * pm, 1)
    # only points selected by some min/max residual have S_v != 0: gather those (padded to the most per face)
    # (NumPy; elsewhere all points are kept: counting the active ones is a device synchronisation)
    Ga = Gb
    if xp is np:
        act = ((sxx + syy) > 0)[..., 0]
        kmax = max(int(act.sum(1).max()), 1)
        idx = xp.argsort(~act, axis=1, kind="stable")[:, :kmax]  # active points first
        idx = (idx + xp.arange(B)[:, None] * (q * pm)).reshape(-1)  # flat: one plain take per array

        def take(arr):
            return arr.reshape((-1,) + arr.shape[2:]).take(idx, 0).reshape((B, kmax) + arr.shape[2:])

        Ga, sxx, sxy, syy = take(Gb), take(sxx), take(sxy), take(syy)  # inactive fillers have S = 0
    SG = xp.stack([sxx * Ga[:, :, 0] + sxy * Ga[:, :, 1], sxy * Ga[:, :, 0] + syy * Ga[:, :, 1]], 2)
    jtj = xp.matmul(Ga.reshape(B, -1, n).transpose(0, 2, 1), SG.reshape(B, -1, n))
    s = max(int(mean_anchor_stride), 1)
    a = terms.anchors[:, ::s].astype(dt)  # (parts, A', 2)
    v = terms.points.astype(dt)
    k = terms.inv_dist[:, ::s].astype(dt) * terms.mean_scale.astype(dt)[:, None, None]  # (parts, A', Pmax)
    c = xp.empty((parts, a.shape[1], 2, pm), dt)
    for j in range(2):
        xp.subtract(v[:, None, :, j], a[:, :, j, None], out=c[:, :, j])
        c[:, :, j] *= k
    gk = xp.ascontiguousarray(G.transpose(0, 2, 1, 3)).reshape(parts, 2 * pm, n)
    jm = xp.matmul(c.reshape(parts, a.shape[1], 2 * pm), gk).reshape(B, -1, n)
    jtj = jtj + float(s) * xp.matmul(jm.transpose(0, 2, 1), jm)
    return 0.5 * (jtj + jtj.transpose(0, 2, 1))


# ------------------------------------------------------------------ benchmark: python -m engine.refine --bench-batch 64

def synthetic_problems(refiner: PrdlRefiner, n: int, seed: int = 0) -> list[RefineProblem]:
    """``n`` refinement problems on synthetic faces (engine.synthetic): ground-truth part masks rendered from
    the mesh, a degraded expression and a slightly wrong pose to start from."""
    from engine.eval_prdl import LabelCrop, render_part_labels
    from engine.synthetic import CASES, sample_face

    model = refiner.model
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        face = sample_face(model, CASES[i % len(CASES)], rng)
        gt = render_part_labels(model, face, face.rotation_cam, face.translation, face.expression)
        targets = refiner.targets(LabelCrop.around_face(gt))
        out.append(RefineProblem(targets, face.camera, face.rotation_cam_start, face.translation_start,
                                 face.perturbed, face.identity, exp_prior=face.perturbed))
    return out


def bench_batch(n_faces: int = 64, reps: int = 10, seed: int = 0, compiled: bool = False) -> list[dict]:
    """Median milliseconds of one batched refinement of ``n_faces`` synthetic faces: NumPy's `refine_batch`, and
    where a CUDA device is present CuPy's (when installed) and torch's (`engine.refine_torch`, from its CUDA graph
    and eagerly; with ``compiled`` also torch.compile'd, then captured). Targets are prepared beforehand (they come
    with the masks)."""
    import time

    from engine.gaze import eye_look_mask

    model = FaceModel.load()
    fixed = eye_look_mask(model.n_exp)
    refiner = PrdlRefiner(model, fixed_exp=fixed)
    problems = synthetic_problems(refiner, n_faces, seed)
    runs = [("numpy", lambda p: refiner.refine_batch(p), lambda: None)]
    if prdl.cupy_available():
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() > 0:
                runs.append(("cupy", lambda p: refiner.refine_batch(p, xp=cupy), cupy.cuda.Stream.null.synchronize))
        except Exception:  # noqa: BLE001 - no CUDA driver / device
            pass
    import torch

    captured = {}  # rows that replay CUDA graphs: their refiner (capture errors are reported)
    if torch.cuda.is_available():
        from engine.refine_torch import TorchRefiner

        graphs, eager = TorchRefiner(refiner, "cuda"), TorchRefiner(refiner, "cuda")
        eager.graphs.enabled = False
        runs += [("torch-cuda-graph", graphs.refine, torch.cuda.synchronize),
                 ("torch-cuda-eager", eager.refine, torch.cuda.synchronize)]
        captured["torch-cuda-graph"] = graphs
        if compiled:
            captured["torch-cuda-compiled-graph"] = fused = TorchRefiner(refiner, "cuda", compiled=True)
            runs.append(("torch-cuda-compiled-graph", fused.refine, torch.cuda.synchronize))
    rows = []
    ref_results = None
    for name, run, sync in runs:
        try:
            res = run(problems)  # warm-up (uploads constants, compiles kernels, captures the graph)
            sync()
        except Exception as exc:  # noqa: BLE001 - one failing variant does not hide the others' figures
            rows.append({"module": name, "faces": n_faces, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        ts = []
        for _ in range(reps if name != "numpy" or n_faces < 8 else max(1, min(reps, 3))):
            t0 = time.perf_counter()
            res = run(problems)
            sync()
            ts.append(time.perf_counter() - t0)
        row = {"module": name, "faces": n_faces, "ms_per_batch": 1e3 * float(np.median(ts)),
               "ms_per_face": 1e3 * float(np.median(ts)) / n_faces}
        if ref_results is None:
            ref_results = res
        else:
            row["max_abs_expression_diff_vs_numpy"] = float(max(np.abs(a.expression - b.expression).max()
                                                                for a, b in zip(res, ref_results)))
        if name in captured:
            row["graph_errors"] = {str(k): v for k, v in captured[name].graphs.errors.items()}
        rows.append(row)
    return rows


def _main(argv=None) -> int:  # pragma: no cover - command line
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m engine.refine", description=__doc__.splitlines()[0])
    ap.add_argument("--bench-batch", type=int, default=64, metavar="N", help="faces per batch (default 64)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compiled", action="store_true", help="also time the torch.compile'd solve (CUDA; compiles "
                    "for minutes)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = bench_batch(args.bench_batch, args.reps, compiled=args.compiled)
    for r in rows:
        if "error" in r:
            print(f"{r['module']:<16} failed: {r['error']}")
            continue
        extra = (f", max |expression diff| vs numpy {r['max_abs_expression_diff_vs_numpy']:.2e}"
                 if "max_abs_expression_diff_vs_numpy" in r else "")
        print(f"{r['module']:<16} batched refinement of {r['faces']} faces: {r['ms_per_batch']:.2f} ms per batch "
              f"({r['ms_per_face']:.3f} ms per face){extra}")
        if r.get("graph_errors"):
            print(f"  graph capture failed, ran eagerly: {r['graph_errors']}")
    if len(rows) == 1:
        print("cupy / torch-cuda not run: no CUDA device" + ("" if prdl.cupy_available() else " (and CuPy is not installed)"))
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
