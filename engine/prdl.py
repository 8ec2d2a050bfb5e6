"""PRDL geometry core: part re-projection distance descriptors, loss, gradient and Gauss-Newton terms.

Written once against an array module ``xp``: NumPy on CPU, CuPy on GPU (``get_array_module``
picks it from the arrays). The CuPy path adds fused CUDA kernels for the anchor-to-point distance
statistics and for the loss gradient; they are compiled on first use and kept next to the NumPy
reference they must match. Without CuPy installed, only NumPy is used. No torch, no network code.

Conventions (see ``docs/prdl_spec.md`` 1.4-1.9):

* points and anchors are 2D image coordinates in pixels (the project's OpenCV convention: pixel
  centres at integers, y down); a label image pixel (row r, col c) is the point (c, r);
* parts are padded to a common length: ``points`` (parts, Pmax, 2) with a boolean ``mask``
  (parts, Pmax); padded entries are ignored wherever they appear (and get zero gradient);
* the descriptor of a point set B at anchor a is [min, max, mean] of sqrt(|a - b|^2 + eps) over b;
  an empty part has descriptor 0 everywhere (a non-empty part always has max >= sqrt(eps) > 0,
  which is how ``target_valid`` is inferred when not given);
* loss = sum_p w_p sum_a sum_f c_f (G_p[a, f] - G*_p[a, f])^2 / |A| with channel weights c_f = 1 by
  default (prdl_spec 1.6); a part empty in the prediction or in the target has weight 0.

Gauss-Newton: ``gauss_newton_terms`` returns residuals r with loss = |r|^2 and their Jacobian with
respect to the 2D points in compact form (one point per min/max residual, a dense (A, Pmax) table
for the mean residuals); ``normal_equations`` chains it with d(points)/d(params) to J^T J and J^T r
without forming the dense point Jacobian. A step is then delta = -solve(JtJ + damping, Jtr).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

try:  # optional GPU path
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - cupy is not installed on CPU machines
    _cupy = None

__all__ = [
    "EPS", "get_array_module", "farthest_point_sample", "anchor_grid", "descriptors", "part_descriptors",
    "descriptor_values",
    "pack_parts", "label_point_sets", "target_from_labels", "part_index", "prdl_loss_and_grad",
    "GNTerms", "gauss_newton_terms", "normal_equations", "dense_point_jacobian", "cupy_available",
]

EPS = 1e-6  # px^2, added inside the square root of every distance (prdl_spec 1.9)


# ------------------------------------------------------------------ array module

def cupy_available() -> bool:
    return _cupy is not None


def get_array_module(*arrays) -> Any:
    """``cupy`` when any argument is a CuPy array (and CuPy is installed), else ``numpy``."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def _is_cupy(xp) -> bool:
    return _cupy is not None and xp is _cupy


def bincount(xp, idx, weights=None, length: int = 0):
    """``xp.bincount(idx, weights, minlength=length)`` for indices known to lie in [0, length): NumPy's
    bincount; elsewhere a scatter-add into ``length`` zeros, because CuPy's bincount reads the largest index
    back to the host (a device synchronisation per call) to size its output."""
    if xp is np:
        return np.bincount(idx, weights=weights, minlength=length)
    out = xp.zeros(length, xp.float64)  # float64 (exact for counts): CuPy before 14.1 has no int64 add.at
    xp.add.at(out, idx, 1.0 if weights is None else weights)
    return out if weights is not None else out.astype(xp.int64)


def _float_dtype(a, xp):
    dt = np.dtype(a.dtype)
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float32)


# ------------------------------------------------------------------ sampling and anchors

def farthest_point_sample(points, k: int, xp=None, *, start: int | None = None,
                          max_candidates: int | None = None):
    """Indices (k,) int64 of ``k`` points of ``points`` (N, 2) chosen by farthest point sampling.

    Deterministic: the first pick is ``start`` or, by default, the point farthest from the
    centroid (first such index on ties); each next pick is the point farthest from all picks
    (first index on ties). If N <= k all indices are returned. Cost O(k * N); with
    ``max_candidates`` a larger N is first thinned to that many evenly strided points, which
    bounds the cost at O(k * max_candidates).
    """
    xp = xp or get_array_module(points)
    pts = xp.asarray(points)
    n = int(pts.shape[0])
    k = int(k)
    if n <= k:
        return xp.arange(n, dtype=xp.int64)
    cand = None
    if max_candidates is not None and n > max(int(max_candidates), k):
        cand = xp.round(xp.linspace(0, n - 1, int(max_candidates))).astype(xp.int64)
        pts = pts[cand]
        n = int(pts.shape[0])
    dt = _float_dtype(pts, xp)
    x = xp.ascontiguousarray(pts[:, 0], dtype=dt)
    y = xp.ascontiguousarray(pts[:, 1], dtype=dt)
    if start is None:
        cx, cy = x.mean(), y.mean()
        start = int(xp.argmax((x - cx) ** 2 + (y - cy) ** 2))
    if _is_cupy(xp):
        idx = _cuda_fps(x, y, k, int(start))
    else:
        idx = _fps_numpy(x, y, k, int(start))
    return cand[idx] if cand is not None else idx


def _fps_numpy(x: np.ndarray, y: np.ndarray, k: int, start: int) -> np.ndarray:
    n = len(x)
    out = np.empty(k, np.int64)
    dist = np.full(n, np.inf, x.dtype)
    dx = np.empty_like(x)
    dy = np.empty_like(y)
    cur = start
    for i in range(k):
        out[i] = cur
        np.subtract(x, x[cur], out=dx)
        np.multiply(dx, dx, out=dx)
        np.subtract(y, y[cur], out=dy)
        np.multiply(dy, dy, out=dy)
        dx += dy
        np.minimum(dist, dx, out=dist)
        cur = int(dist.argmax())
    return out


def anchor_grid(n, box: Sequence[float], xp=None, dtype=np.float64):
    """(ny * nx, 2) anchors (x, y) at the cell centres of an ny x nx grid over ``box`` (x0, y0, x1, y1).

    ``n`` is an int (square grid) or (nx, ny). Row-major: anchor index = iy * nx + ix, so any
    per-anchor array reshapes to an (ny, nx) "distance map". A box (-0.5, -0.5, W - 0.5, H - 0.5)
    with n = (W, H) puts one anchor on every pixel centre.
    """
    xp = xp or np
    nx, ny = (int(n), int(n)) if np.isscalar(n) else (int(n[0]), int(n[1]))
    x0, y0, x1, y1 = (float(b) for b in box)
    xs = x0 + (xp.arange(nx, dtype=dtype) + 0.5) * ((x1 - x0) / nx)
    ys = y0 + (xp.arange(ny, dtype=dtype) + 0.5) * ((y1 - y0) / ny)
    gx, gy = xp.meshgrid(xs, ys)
    return xp.stack([gx.reshape(-1), gy.reshape(-1)], axis=-1)


# ------------------------------------------------------------------ part point sets

def pack_parts(point_sets: Sequence, xp=None, *, pmax: int | None = None, dtype=None):
    """List of (P_i, 2) arrays -> (points (parts, Pmax, 2), mask (parts, Pmax) bool), padded with 0."""
    xp = xp or (get_array_module(*point_sets) if len(point_sets) else np)
    sizes = [int(p.shape[0]) for p in point_sets]
    pm = max([1] + sizes) if pmax is None else int(pmax)
    if max(sizes, default=0) > pm:
        raise ValueError(f"a part has {max(sizes)} points, more than pmax={pm}")
    if dtype is None:
        dtype = np.result_type(*[p.dtype for p in point_sets]) if point_sets else np.float64
        if not np.issubdtype(dtype, np.floating):
            dtype = np.float32
    pts = xp.zeros((len(point_sets), pm, 2), dtype)
    mask = xp.zeros((len(point_sets), pm), bool)
    for i, p in enumerate(point_sets):
        pts[i, : sizes[i]] = xp.asarray(p)
        mask[i, : sizes[i]] = True
    return pts, mask


def label_point_sets(labels, n_parts: int = 8, *, max_points: int | None = None,
                     max_candidates: int | None = 20000, xp=None) -> list:
    """Target point sets C_p of an (H, W) int label image (-1 or < 0: none; p: part p).

    Returns ``n_parts`` arrays (P_p, 2) float32 of pixel coordinates (x = col, y = row). With
    ``max_points``, larger sets are reduced by farthest point sampling (prdl_spec 1.7).
    """
    xp = xp or get_array_module(labels)
    lab = xp.asarray(labels)
    rows, cols = xp.nonzero(lab >= 0)
    vals = lab[rows, cols]
    sets = []
    for p in range(n_parts):
        sel = vals == p
        pts = xp.stack([cols[sel], rows[sel]], -1).astype(xp.float32)  # row-major pixel order
        if max_points is not None and pts.shape[0] > max_points:
            pts = pts[farthest_point_sample(pts, max_points, xp, max_candidates=max_candidates)]
        sets.append(pts)
    return sets


def target_from_labels(labels, anchors, n_parts: int = 8, *, max_points: int | None = None,
                       dtype=None, xp=None, eps: float = EPS):
    """Target descriptors of a label image: (desc (parts, A, 3), valid (parts,) bool)."""
    xp = xp or get_array_module(labels, anchors)
    sets = label_point_sets(labels, n_parts, max_points=max_points, xp=xp)
    pts, mask = pack_parts(sets, xp, dtype=dtype or anchors.dtype)
    desc = part_descriptors(pts, mask, xp.asarray(anchors, pts.dtype), xp, eps=eps)
    return desc, mask.any(1)


def part_index(part_labels, n_parts: int = 8, *, max_points: int | None = None, layout=None):
    """Padded vertex indices per part, for gathering predicted points from projected vertices.

    ``part_labels`` (V,) int (-1 none). Returns (index (parts, Pmax) int64 with -1 padding,
    valid (parts, Pmax) bool). With ``max_points``, a part with more vertices keeps a fixed subset
    chosen by farthest point sampling on ``layout`` (V, 2), e.g. the neutral mesh's frontal (x, y).
    Gather with ``verts2d[np.maximum(index, 0)]``; mask with ``valid & visible[np.maximum(index, 0)]``.
    """
    lab = np.asarray(part_labels)
    groups = []
    for p in range(n_parts):
        ids = np.nonzero(lab == p)[0]
        if max_points is not None and len(ids) > max_points:
            if layout is None:
                raise ValueError("max_points needs a layout (V, 2) for farthest point sampling")
            sel = farthest_point_sample(np.asarray(layout)[ids, :2], max_points, np)
            ids = np.sort(ids[sel])
        groups.append(ids)
    pm = max([1] + [len(g) for g in groups])
    index = np.full((n_parts, pm), -1, np.int64)
    for p, g in enumerate(groups):
        index[p, : len(g)] = g
    return index, index >= 0


# ------------------------------------------------------------------ descriptors (reference + batched)

def descriptors(points, anchors, xp=None, eps: float = EPS):
    """(A, 3) [min, max, mean] of sqrt(|a - p|^2 + eps) over the points (P, 2), per anchor (A, 2).

    Plain broadcasting reference (materialises (A, P)); an empty point set gives zeros.
    """
    xp = xp or get_array_module(points, anchors)
    p = xp.asarray(points)
    a = xp.asarray(anchors)
    dt = np.result_type(_float_dtype(p, xp), _float_dtype(a, xp))
    if p.shape[0] == 0:
        return xp.zeros((a.shape[0], 3), dt)
    d = a[:, None, :].astype(dt) - p[None, :, :].astype(dt)
    d = xp.sqrt((d * d).sum(-1) + eps)
    return xp.stack([d.min(1), d.max(1), d.mean(1)], -1)


def part_descriptors(points, mask, anchors, xp=None, eps: float = EPS, *, return_index: bool = False):
    """Batched descriptors of padded part point sets.

    ``points`` (parts, Pmax, 2), ``mask`` (parts, Pmax) bool, ``anchors`` (A, 2) -> (parts, A, 3)
    in the points' dtype (empty parts give zeros). With ``return_index`` also the argmin / argmax
    point index per anchor, (parts, A, 2) int64 (valid points only; 0 for empty parts).
    On CuPy arrays this runs the fused CUDA kernel.
    """
    xp = xp or get_array_module(points, anchors)
    pts, mask, anchors = _as_inputs(points, mask, anchors, xp)
    if _is_cupy(xp) and anchors.ndim == 2:
        desc, idx, _ = _cuda_stats(pts, mask, anchors, eps)
    else:
        desc, idx, _, _, _ = _stats(pts, mask, anchors, eps, xp)
    return (desc, idx) if return_index else desc


def descriptor_values(points, mask, anchors, xp=None, eps: float = EPS):
    """[min, max, mean] descriptors (parts, A, 3) only, no arg-indices: the cheap path for evaluating a loss
    (same values as `part_descriptors`; on CuPy with one shared grid the fused kernel runs)."""
    xp = xp or get_array_module(points, anchors)
    pts, mask, anchors = _as_inputs(points, mask, anchors, xp)
    if _is_cupy(xp) and anchors.ndim == 2:
        return _cuda_stats(pts, mask, anchors, eps)[0]
    d, counts = _sq_distances(pts, mask, anchors, eps, xp)[:2]
    xp.sqrt(d, out=d)
    dt = d.dtype
    mean = xp.matmul(d, mask.astype(dt)[..., None])[..., 0] / xp.maximum(counts, 1).astype(dt)[:, None]
    desc = xp.empty(d.shape[:2] + (3,), dt)
    desc[..., 0] = xp.take_along_axis(d, d.argmin(-1)[..., None], -1)[..., 0]  # arg-reductions: faster than min
    desc[..., 1] = xp.take_along_axis(d, d.argmax(-1)[..., None], -1)[..., 0]
    desc[..., 2] = mean
    desc *= (counts > 0).astype(dt)[:, None, None]
    return desc


def _sq_distances(pts, mask, anchors, eps, xp):
    """Squared distances + eps (parts, A, Pmax) (padded columns: the part's first valid point), counts,
    filled points, first valid index. One matrix product of augmented coordinates centred on the anchors."""
    parts, pm, _ = pts.shape
    dt = pts.dtype
    filled, first = _fill_invalid(pts, mask, xp)
    c = anchors.sum(-2, keepdims=True) * dt.type(1.0 / anchors.shape[-2])
    a = anchors - c
    v = filled - (c if anchors.ndim == 3 else c[None])
    a_aug = xp.empty(a.shape[:-1] + (4,), dt)
    a_aug[..., :2] = a
    a_aug[..., 2] = a[..., 0] * a[..., 0] + a[..., 1] * a[..., 1]
    a_aug[..., 3] = 1.0
    v_aug = xp.empty((parts, 4, pm), dt)
    v_aug[:, 0] = -2.0 * v[..., 0]
    v_aug[:, 1] = -2.0 * v[..., 1]
    v_aug[:, 2] = 1.0
    v_aug[:, 3] = v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + dt.type(eps)
    d = xp.matmul(a_aug, v_aug)
    # cancellation can leave a squared distance below eps (or negative): clamp where it can (NumPy checks the
    # bound first, to skip a pass; elsewhere reading the bound back would cost a device synchronisation)
    if xp is not np or eps <= 64 * float(xp.finfo(dt).eps) * (float(a_aug[..., 2].max()) + float(v_aug[:, 3].max())):
        xp.maximum(d, dt.type(eps), out=d)
    return d, mask.sum(1), filled, first


def _as_inputs(points, mask, anchors, xp):
    pts = xp.asarray(points)
    dt = _float_dtype(pts, xp)
    pts = xp.ascontiguousarray(pts, dtype=dt)
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"points must be (parts, Pmax, 2), got {pts.shape}")
    mask = xp.ascontiguousarray(xp.asarray(mask, dtype=bool))
    if mask.shape != pts.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match points {pts.shape}")
    anchors = xp.ascontiguousarray(xp.asarray(anchors), dtype=dt)
    if anchors.ndim == 3 and anchors.shape[0] != pts.shape[0]:
        raise ValueError(f"per-part anchors {anchors.shape} do not match {pts.shape[0]} parts")
    return pts, mask, anchors


def _per_part(anchors, parts: int, xp):
    """Anchors as (parts, A, 2): a shared (A, 2) grid is broadcast, per-part grids pass through."""
    return anchors if anchors.ndim == 3 else xp.broadcast_to(anchors[None], (parts,) + anchors.shape)


def _fill_invalid(pts, mask, xp):
    """Padded entries take the coordinates of their part's first valid point (0 if the part is
    empty), so they never change a min, max or (with the count correction) a mean."""
    parts = pts.shape[0]
    first = xp.argmax(mask, axis=1)  # 0 for an empty part
    fp = pts[xp.arange(parts), first]  # (parts, 2)
    filled = xp.where(mask[..., None], pts, fp[:, None, :])
    return filled, first


def _stats(pts, mask, anchors, eps, xp):
    """Array-module reference for the distance statistics.

    Returns desc (parts, A, 3), idx (parts, A, 2) [argmin, argmax], D (parts, A, Pmax) distances
    (padded columns hold the distance to the part's first valid point), counts (parts,).
    Squared distances come from one matrix product of augmented coordinates, centred on the
    anchors' mean to limit cancellation: |a|^2 - 2 a.v + |v|^2 + eps, clamped at eps.
    """
    parts = pts.shape[0]
    dt = pts.dtype
    d, counts, filled, first = _sq_distances(pts, mask, anchors, eps, xp)
    xp.sqrt(d, out=d)
    imin = d.argmin(-1)
    imax = d.argmax(-1)
    ar = xp.arange(parts)[:, None]
    # a padded entry can only win a tie with the part's first valid point: hand it back to that point
    imin = xp.where(mask[ar, imin], imin, first[:, None])
    imax = xp.where(mask[ar, imax], imax, first[:, None])
    idx = xp.empty(imin.shape + (2,), xp.int64)
    idx[..., 0], idx[..., 1] = imin, imax
    rows = xp.arange(imin.size)
    d2 = d.reshape(imin.size, -1)
    desc = xp.empty(imin.shape + (3,), dt)
    desc[..., 0] = d2[rows, imin.reshape(-1)].reshape(imin.shape)
    desc[..., 1] = d2[rows, imax.reshape(-1)].reshape(imin.shape)
    desc[..., 2] = xp.matmul(d, mask.astype(dt)[..., None])[..., 0] / xp.maximum(counts, 1).astype(dt)[:, None]
    desc *= (counts > 0).astype(dt)[:, None, None]
    return desc, idx, d, counts, filled


# ------------------------------------------------------------------ loss and gradient

def _effective_weights(mask, target_desc, target_valid, part_weights, channel_weights, xp, dt):
    parts = mask.shape[0]
    if target_valid is None:
        target_valid = target_desc[:, :, 1].max(1) > 0  # a non-empty set has f_max >= sqrt(eps) > 0
    w = xp.ones(parts, dt) if part_weights is None else xp.asarray(part_weights, dt).reshape(parts)
    used = mask.any(1) & xp.asarray(target_valid, bool) & (w != 0)
    w = xp.where(used, w, 0).astype(dt)
    ch = xp.ones(3, dt) if channel_weights is None else xp.asarray(channel_weights, dt).reshape(3)
    return w, ch, used


def _residual_scale(w, ch, na: int, xp):
    """(parts, 3) factors whose squares weigh each descriptor difference: part weight x channel weight / |A|."""
    return xp.sqrt(w[:, None] * ch[None, :] / na)


def weighted_residuals(pred_points, pred_mask, target_desc, anchors, part_weights=None, *, target_valid=None,
                       channel_weights=None, xp=None, eps: float = EPS):
    """The PRDL residuals (parts, A, 3) alone -- descriptor differences scaled so that their squares sum to
    the loss of `prdl_loss_and_grad` -- without arg-indices or Jacobian terms (the cheap path for a trial step)."""
    xp = xp or get_array_module(pred_points, target_desc, anchors)
    pts, mask, anchors = _as_inputs(pred_points, pred_mask, anchors, xp)
    dt = pts.dtype
    target_desc = xp.asarray(target_desc, dt)
    w, ch, _ = _effective_weights(mask, target_desc, target_valid, part_weights, channel_weights, xp, dt)
    desc = descriptor_values(pts, mask, anchors, xp, eps)
    return _residual_scale(w, ch, anchors.shape[-2], xp)[:, None, :] * (desc - target_desc)


def prdl_loss_and_grad(pred_points, pred_mask, target_desc, anchors, part_weights=None, *,
                       target_valid=None, channel_weights=None, xp=None, eps: float = EPS):
    """PRDL loss and its gradient with respect to the predicted 2D points.

    pred_points (parts, Pmax, 2), pred_mask (parts, Pmax) bool, target_desc (parts, A, 3) (from
    ``part_descriptors`` / ``target_from_labels``), anchors (A, 2), part_weights (parts,) or None
    (ones). ``target_valid`` (parts,) marks non-empty targets (inferred from target_desc when None).
    ``channel_weights`` (3,) weights [min, max, mean] (default ones = prdl_spec 1.6).

    loss = sum_p w_p sum_a sum_f c_f (G_p - G*_p)^2 / |A|. Gradient (prdl_spec 1.9): per anchor the
    min term moves only the argmin point, the max term only the argmax point, the mean term all
    valid points with factor 1/|V_p|. Returns (loss, grad (parts, Pmax, 2)); grad is 0 on padded
    points and on excluded parts. ``loss`` is a Python float on NumPy, a 0-d array on CuPy.
    """
    xp = xp or get_array_module(pred_points, target_desc, anchors)
    pts, mask, anchors = _as_inputs(pred_points, pred_mask, anchors, xp)
    dt = pts.dtype
    target_desc = xp.asarray(target_desc, dt)
    na = anchors.shape[-2]
    w, ch, _ = _effective_weights(mask, target_desc, target_valid, part_weights, channel_weights, xp, dt)
    if _is_cupy(xp) and anchors.ndim == 2:
        return _cuda_loss_and_grad(pts, mask, anchors, target_desc, w, ch, eps)

    desc, idx, d, counts, filled = _stats(pts, mask, anchors, eps, xp)
    diff = desc - target_desc
    wc = w[:, None] * ch[None, :] / na  # (parts, 3)
    loss = float((wc[:, None, :] * diff * diff).sum())
    coef = 2.0 * wc[:, None, :] * diff  # dloss / d(descriptor)
    parts, pm, _ = pts.shape

    # min / max: one point per anchor; d(dist)/dv = (v - a) / dist
    g = xp.zeros((parts * pm, 2), dt)
    flat = (idx + (xp.arange(parts) * pm)[:, None, None]).reshape(-1)  # (parts*A*2,)
    dsel = xp.maximum(desc[..., :2], np.sqrt(eps))  # empty parts have zero descriptors (and zero coef)
    csel = (coef[..., :2] / dsel).reshape(-1)
    vsel = filled.reshape(-1, 2)[flat]
    ap = _per_part(anchors, parts, xp)
    asel = xp.broadcast_to(ap[:, :, None, :], (parts, na, 2, 2)).reshape(-1, 2)
    contrib = csel[:, None] * (vsel - asel)
    n = parts * pm
    g[:, 0] = bincount(xp, flat, contrib[:, 0], n)
    g[:, 1] = bincount(xp, flat, contrib[:, 1], n)
    g = g.reshape(parts, pm, 2)

    # mean: every valid point; sum_a c_a (v - a) / d_av = v * (c @ 1/D) - (c * a) @ 1/D
    cm = coef[..., 2] / xp.maximum(counts, 1).astype(dt)[:, None]  # (parts, A)
    xp.reciprocal(d, out=d)
    wmat = xp.empty((parts, 3, na), dt)
    wmat[:, 0] = cm
    wmat[:, 1] = cm * ap[..., 0]
    wmat[:, 2] = cm * ap[..., 1]
    s = xp.matmul(wmat, d)  # (parts, 3, Pmax)
    g[..., 0] += filled[..., 0] * s[:, 0] - s[:, 1]
    g[..., 1] += filled[..., 1] * s[:, 0] - s[:, 2]
    g *= mask[..., None]
    return loss, g


# ------------------------------------------------------------------ Gauss-Newton building block

@dataclass
class GNTerms:
    """Residuals of the PRDL loss (loss = |r|^2) and their compact Jacobian w.r.t. the 2D points.

    Residual layout: r.reshape(parts, A, 3)[p, a, f] = sqrt(w_p c_f / |A|) (G_p - G*_p)[a, f].
      * min / max rows (f = 0, 1) depend on one point, ``index[p, a, f]``, with
        d r / d v = ``unit[p, a, f]`` (2,) (the scaled unit vector (v - a) / d);
      * mean rows (f = 2) depend on every valid point v of part p:
        d r / d v = ``mean_scale[p] * inv_dist[p, a, v] * (points[p, v] - anchors[a])``.
    ``grad`` is d loss / d points (= 2 J^T r), zero on padded points and unused parts.
    """

    residuals: Any  # (parts * A * 3,)
    loss: float
    grad: Any  # (parts, Pmax, 2)
    index: Any  # (parts, A, 2) int64
    unit: Any  # (parts, A, 2, 2)
    inv_dist: Any  # (parts, A, Pmax), 1 / distance (padded columns: unused)
    mean_scale: Any  # (parts,)
    points: Any  # (parts, Pmax, 2), padded entries filled
    mask: Any  # (parts, Pmax) bool
    anchors: Any  # (A, 2) shared, or (parts, A, 2) per part
    used: Any  # (parts,) bool: parts that contribute

    @property
    def shape(self) -> tuple[int, int, int]:
        parts, pm = self.mask.shape
        return parts, int(self.anchors.shape[-2]), pm


def gauss_newton_terms(pred_points, pred_mask, target_desc, anchors, part_weights=None, *,
                       target_valid=None, channel_weights=None, xp=None, eps: float = EPS) -> GNTerms:
    """Residuals and compact point Jacobian of the PRDL loss (same arguments as ``prdl_loss_and_grad``)."""
    xp = xp or get_array_module(pred_points, target_desc, anchors)
    pts, mask, anchors = _as_inputs(pred_points, pred_mask, anchors, xp)
    dt = pts.dtype
    target_desc = xp.asarray(target_desc, dt)
    parts, pm, _ = pts.shape
    na = anchors.shape[-2]
    w, ch, used = _effective_weights(mask, target_desc, target_valid, part_weights, channel_weights, xp, dt)
    if _is_cupy(xp) and anchors.ndim == 2:
        desc, idx, counts = _cuda_stats(pts, mask, anchors, eps)
        d = None
        filled, _ = _fill_invalid(pts, mask, xp)
    else:
        desc, idx, d, counts, filled = _stats(pts, mask, anchors, eps, xp)
    sw = _residual_scale(w, ch, na, xp)  # (parts, 3)
    r = sw[:, None, :] * (desc - target_desc)
    loss_arr = (r * r).sum()
    # min / max rows
    ar = xp.arange(parts)[:, None, None]
    vsel = filled[ar, idx]  # (parts, A, 2, 2)
    dsel = xp.maximum(desc[..., :2, None], np.sqrt(eps))
    ap = _per_part(anchors, parts, xp)  # (parts, A, 2)
    unit = (vsel - ap[:, :, None, :]) * (sw[:, None, :2, None] / dsel)
    # mean rows
    if d is None:
        diff = ap[:, :, None, :] - filled[:, None, :, :]
        d = xp.sqrt((diff * diff).sum(-1) + eps)
    xp.reciprocal(d, out=d)
    mean_scale = sw[:, 2] / xp.maximum(counts, 1).astype(dt)
    # gradient = 2 J^T r
    rr = r * 2.0
    flat = (idx + (xp.arange(parts) * pm)[:, None, None]).reshape(-1, 1) * 2 + xp.arange(2)  # (x, y) slots
    contrib = rr[..., :2, None] * unit
    g = bincount(xp, flat.reshape(-1), contrib.reshape(-1), parts * pm * 2)
    g = g.astype(dt).reshape(parts, pm, 2)
    cm = rr[..., 2] * mean_scale[:, None]  # (parts, A)
    wmat = xp.empty((parts, 3, na), dt)
    wmat[:, 0] = cm
    wmat[:, 1] = cm * ap[..., 0]
    wmat[:, 2] = cm * ap[..., 1]
    s = xp.matmul(wmat, d)
    g[..., 0] += filled[..., 0] * s[:, 0] - s[:, 1]
    g[..., 1] += filled[..., 1] * s[:, 0] - s[:, 2]
    g *= mask[..., None]
    loss = float(loss_arr) if not _is_cupy(xp) else loss_arr
    return GNTerms(r.reshape(-1), loss, g, idx, unit, d, mean_scale, filled, mask, anchors, used)


def normal_equations(points_jac, terms: GNTerms, *, mean_anchor_stride: int = 1):
    """J^T J (n, n) and J^T r (n,) for parameters whose points move as ``points_jac``.

    ``points_jac`` (parts, Pmax, 2, n) = d(points)/d(params) (rows of padded points are ignored).
    J^T r is exact (it is half the chained point gradient). J^T J is the exact Gauss-Newton matrix:
    the min/max rows are summed per point as G_v^T S_v G_v with S_v = sum of u u^T over the
    residuals that select v (no per-residual rows formed); the mean rows are formed per part as
    (A, n) blocks. ``mean_anchor_stride`` > 1 approximates the mean block from every s-th anchor
    (scaled by s), cutting its cost by s; J^T r stays exact, so Gauss-Newton still converges to
    the same stationary point.
    """
    xp = get_array_module(points_jac, terms.grad)
    dt = np.result_type(points_jac.dtype, terms.grad.dtype)
    parts, na, pm = terms.shape
    G = xp.asarray(points_jac, dt) * terms.mask[..., None, None]
    n = G.shape[-1]
    Gf = G.reshape(parts * pm, 2, n)
    jtr = 0.5 * xp.einsum("vk,vkn->n", terms.grad.reshape(-1, 2).astype(dt), Gf)

    # min / max rows: S_v = sum u u^T per selected point
    flat = (terms.index + (xp.arange(parts) * pm)[:, None, None]).reshape(-1)
    u = terms.unit.reshape(-1, 2).astype(dt)
    nv = parts * pm
    sxx = bincount(xp, flat, u[:, 0] * u[:, 0], nv).astype(dt)
    sxy = bincount(xp, flat, u[:, 0] * u[:, 1], nv).astype(dt)
    syy = bincount(xp, flat, u[:, 1] * u[:, 1], nv).astype(dt)
    act = xp.nonzero((sxx + syy) > 0)[0]
    Ga = Gf[act]  # (m, 2, n)
    SG = xp.stack([sxx[act, None] * Ga[:, 0] + sxy[act, None] * Ga[:, 1],
                   sxy[act, None] * Ga[:, 0] + syy[act, None] * Ga[:, 1]], 1)
    jtj = Ga.reshape(-1, n).T @ SG.reshape(-1, n)

    # mean rows: J_mean[p] (A, n) = C_p (A, 2 Pmax) @ G_p (2 Pmax, n) with
    # C_p[a, (k, v)] = mean_scale_p * inv_dist[p, a, v] * (v - a)_k
    s = max(int(mean_anchor_stride), 1)
    used = terms.used.get() if _is_cupy(xp) else np.asarray(terms.used)
    sel = np.nonzero(used)[0]
    if len(sel):
        if _is_cupy(xp):
            sel = xp.asarray(sel)
        nu = len(sel)
        a = _per_part(terms.anchors, parts, xp)[sel, ::s].astype(dt)  # (u, A', 2)
        v = terms.points[sel].astype(dt)  # (u, Pmax, 2)
        k = terms.inv_dist[sel, ::s].astype(dt) * terms.mean_scale[sel].astype(dt)[:, None, None]
        c = xp.empty((nu, a.shape[1], 2, pm), dt)
        for j in range(2):  # (u, A', Pmax) slabs: long inner loops
            xp.subtract(v[:, None, :, j], a[:, :, j, None], out=c[:, :, j])
            c[:, :, j] *= k
        gk = xp.ascontiguousarray(G[sel].transpose(0, 2, 1, 3)).reshape(nu, 2 * pm, n)  # rows (k, v)
        jm = xp.matmul(c.reshape(nu, a.shape[1], 2 * pm), gk).reshape(-1, n)
        jtj += (jm.T * float(s)) @ jm if s > 1 else jm.T @ jm
    return 0.5 * (jtj + jtj.T), jtr


def dense_point_jacobian(terms: GNTerms):
    """Dense (parts*A*3, parts*Pmax*2) Jacobian of the residuals w.r.t. the points (tests, debugging)."""
    xp = get_array_module(terms.grad)
    parts, na, pm = terms.shape
    dt = terms.grad.dtype
    J = xp.zeros((parts, na, 3, parts, pm, 2), dt)
    for p in range(parts):
        if not bool(terms.used[p]):
            continue
        for f in range(2):
            J[p, xp.arange(na), f, p, terms.index[p, :, f], :] = terms.unit[p, :, f]
        diff = terms.points[p][None, :, :] - _per_part(terms.anchors, parts, xp)[p][:, None, :]  # (A, Pmax, 2)
        J[p, :, 2, p] = terms.mean_scale[p] * terms.inv_dist[p][..., None] * diff * terms.mask[p][None, :, None]
    return J.reshape(parts * na * 3, parts * pm * 2)


# ------------------------------------------------------------------ CUDA kernels (CuPy only)
#
# Each kernel mirrors the NumPy reference above:
#   prdl_stats : one thread per (part, anchor): min/argmin, max/argmax and sum of
#                sqrt(dx^2 + dy^2 + eps) over the part's valid points (points staged through
#                shared memory in tiles); ties keep the first index, as numpy's argmin/argmax.
#   prdl_grad  : one thread per (part, point): sum over anchors of c_a (v - a) / d_av where
#                c_a = cmean[a] + cmin[a] [v is the argmin] + cmax[a] [v is the argmax] (anchors
#                and coefficients staged through shared memory). No atomics.
#   fps        : one block; per iteration each thread updates its points' running distance and the
#                block reduces (max value, first index) -- numpy's argmax.
# Squares and sums use explicit round-to-nearest intrinsics so no FMA contraction changes FPS ties.

_CUDA_SRC = r"""
#define TILE 256
template <typename T> __device__ __forceinline__ T inf_val();
template <> __device__ __forceinline__ float inf_val<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf_val<double>() { return __longlong_as_double(0x7ff0000000000000LL); }
template <typename T> __device__ __forceinline__ T mul_rn(T a, T b);
template <> __device__ __forceinline__ float mul_rn<float>(float a, float b) { return __fmul_rn(a, b); }
template <> __device__ __forceinline__ double mul_rn<double>(double a, double b) { return __dmul_rn(a, b); }
template <typename T> __device__ __forceinline__ T add_rn(T a, T b);
template <> __device__ __forceinline__ float add_rn<float>(float a, float b) { return __fadd_rn(a, b); }
template <> __device__ __forceinline__ double add_rn<double>(double a, double b) { return __dadd_rn(a, b); }

template <typename T>
__global__ void prdl_stats(const T* __restrict__ pts, const bool* __restrict__ mask,
                           const T* __restrict__ anchors, int P, int A, T eps,
                           T* __restrict__ out, long long* __restrict__ idx) {
    __shared__ T sx[TILE];
    __shared__ T sy[TILE];
    __shared__ bool sm[TILE];
    const int p = blockIdx.y;
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    T ax = 0, ay = 0;
    if (a < A) { ax = anchors[2 * a]; ay = anchors[2 * a + 1]; }
    T dmin = 0, dmax = 0, sum = 0;
    long long imin = -1, imax = -1;
    for (int t0 = 0; t0 < P; t0 += TILE) {
        const int n = min(TILE, P - t0);
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const long long q = (long long)p * P + t0 + j;
            sx[j] = pts[2 * q]; sy[j] = pts[2 * q + 1]; sm[j] = mask[q];
        }
        __syncthreads();
        if (a < A) {
            for (int j = 0; j < n; ++j) {
                if (!sm[j]) continue;
                const T dx = sx[j] - ax, dy = sy[j] - ay;
                const T d = sqrt(add_rn(add_rn(mul_rn(dx, dx), mul_rn(dy, dy)), eps));
                sum += d;
                if (imin < 0 || d < dmin) { dmin = d; imin = t0 + j; }
                if (imax < 0 || d > dmax) { dmax = d; imax = t0 + j; }
            }
        }
        __syncthreads();
    }
    if (a < A) {
        const long long o = (long long)p * A + a;
        out[3 * o] = dmin; out[3 * o + 1] = dmax; out[3 * o + 2] = sum;
        idx[2 * o] = imin < 0 ? 0 : imin; idx[2 * o + 1] = imax < 0 ? 0 : imax;
    }
}

template <typename T>
__global__ void prdl_grad(const T* __restrict__ pts, const bool* __restrict__ mask,
                          const T* __restrict__ anchors, const T* __restrict__ coef,
                          const long long* __restrict__ idx, int P, int A, T eps,
                          T* __restrict__ grad) {
    // coef (parts, A, 3): [cmin, cmax, cmean]; idx (parts, A, 2): [argmin, argmax]
    __shared__ T sax[TILE];
    __shared__ T say[TILE];
    __shared__ T sc[3 * TILE];
    __shared__ long long si[2 * TILE];
    const int p = blockIdx.y;
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    const long long q = (long long)p * P + v;
    bool ok = false;
    T vx = 0, vy = 0;
    if (v < P) { ok = mask[q]; vx = pts[2 * q]; vy = pts[2 * q + 1]; }
    T gx = 0, gy = 0;
    for (int t0 = 0; t0 < A; t0 += TILE) {
        const int n = min(TILE, A - t0);
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const long long o = (long long)p * A + t0 + j;
            sax[j] = anchors[2 * (t0 + j)]; say[j] = anchors[2 * (t0 + j) + 1];
            sc[3 * j] = coef[3 * o]; sc[3 * j + 1] = coef[3 * o + 1]; sc[3 * j + 2] = coef[3 * o + 2];
            si[2 * j] = idx[2 * o]; si[2 * j + 1] = idx[2 * o + 1];
        }
        __syncthreads();
        if (ok) {
            for (int j = 0; j < n; ++j) {
                const T dx = vx - sax[j], dy = vy - say[j];
                const T d = sqrt(add_rn(add_rn(mul_rn(dx, dx), mul_rn(dy, dy)), eps));
                T c = sc[3 * j + 2];
                if (si[2 * j] == v) c += sc[3 * j];
                if (si[2 * j + 1] == v) c += sc[3 * j + 1];
                c /= d;
                gx += c * dx; gy += c * dy;
            }
        }
        __syncthreads();
    }
    if (v < P) { grad[2 * q] = ok ? gx : T(0); grad[2 * q + 1] = ok ? gy : T(0); }
}

template <typename T>
__global__ void fps(const T* __restrict__ x, const T* __restrict__ y, int N, int k, int start,
                    T* __restrict__ dist, long long* __restrict__ out) {
    __shared__ T sval[1024];
    __shared__ int sidx[1024];
    const int tid = threadIdx.x;
    for (int i = tid; i < N; i += blockDim.x) dist[i] = inf_val<T>();
    __syncthreads();
    int cur = start;
    for (int it = 0; it < k; ++it) {
        if (tid == 0) out[it] = cur;
        const T cx = x[cur], cy = y[cur];
        T best = -1; int bi = N;
        for (int i = tid; i < N; i += blockDim.x) {
            const T dx = x[i] - cx, dy = y[i] - cy;
            const T d = add_rn(mul_rn(dx, dx), mul_rn(dy, dy));
            const T m = d < dist[i] ? d : dist[i];
            dist[i] = m;
            if (m > best) { best = m; bi = i; }
        }
        sval[tid] = best; sidx[tid] = bi;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (tid < s) {
                const T ov = sval[tid + s]; const int oi = sidx[tid + s];
                if (ov > sval[tid] || (ov == sval[tid] && oi < sidx[tid])) { sval[tid] = ov; sidx[tid] = oi; }
            }
            __syncthreads();
        }
        cur = sidx[0];
        __syncthreads();
    }
}
"""

_CUDA_NAMES = ("prdl_stats<float>", "prdl_stats<double>", "prdl_grad<float>", "prdl_grad<double>",
               "fps<float>", "fps<double>")
_cuda_module = None


def _kernel(name: str, dtype):
    global _cuda_module
    if _cuda_module is None:
        _cuda_module = _cupy.RawModule(code=_CUDA_SRC, options=("-std=c++14",), name_expressions=_CUDA_NAMES)
    t = "float" if np.dtype(dtype) == np.float32 else "double"
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"CUDA kernels take float32 or float64, got {dtype}")
    return _cuda_module.get_function(f"{name}<{t}>")


def _cuda_stats(pts, mask, anchors, eps):
    cp = _cupy
    parts, pm, _ = pts.shape
    na = anchors.shape[0]
    dt = pts.dtype
    out = cp.empty((parts, na, 3), dt)
    idx = cp.empty((parts, na, 2), cp.int64)
    block = 256
    _kernel("prdl_stats", dt)(((na + block - 1) // block, parts), (block,),
                              (pts, mask, anchors, np.int32(pm), np.int32(na), dt.type(eps), out, idx))
    counts = mask.sum(1)
    out[..., 2] /= cp.maximum(counts, 1).astype(dt)[:, None]
    out *= (counts > 0).astype(dt)[:, None, None]
    return out, idx, counts


def _cuda_loss_and_grad(pts, mask, anchors, target_desc, w, ch, eps):
    cp = _cupy
    parts, pm, _ = pts.shape
    na = anchors.shape[0]
    dt = pts.dtype
    desc, idx, counts = _cuda_stats(pts, mask, anchors, eps)
    diff = desc - target_desc
    wc = w[:, None] * ch[None, :] / na
    loss = (wc[:, None, :] * diff * diff).sum()
    coef = 2.0 * wc[:, None, :] * diff
    coef[..., 2] /= cp.maximum(counts, 1).astype(dt)[:, None]
    coef = cp.ascontiguousarray(coef)
    grad = cp.empty((parts, pm, 2), dt)
    block = 128
    _kernel("prdl_grad", dt)(((pm + block - 1) // block, parts), (block,),
                             (pts, mask, anchors, coef, idx, np.int32(pm), np.int32(na), dt.type(eps), grad))
    return loss, grad


def _cuda_fps(x, y, k: int, start: int):
    cp = _cupy
    n = x.shape[0]
    dist = cp.empty(n, x.dtype)
    out = cp.empty(k, cp.int64)
    _kernel("fps", x.dtype)((1,), (1024,), (x, y, np.int32(n), np.int32(k), np.int32(start), dist, out))
    return out


# ------------------------------------------------------------------ benchmark: python -m engine.prdl

def _bench(xp=np, dtype=np.float32, grids=(16, 24, 32), sizes=(64, 128, 256), parts: int = 8,
           n_params: int = 59, reps: int = 30) -> list[tuple]:
    """Median ms of loss+grad, GN terms and normal equations on random part sets."""
    import time

    sync = (lambda: _cupy.cuda.Stream.null.synchronize()) if _is_cupy(xp) else (lambda: None)
    rng = np.random.default_rng(0)
    rows = []

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    for n in grids:
        anchors = xp.asarray(anchor_grid(n, (-0.5, -0.5, 223.5, 223.5), dtype=dtype))
        for pm in sizes:
            pts = xp.asarray(rng.uniform(40, 180, (parts, pm, 2)).astype(dtype))
            mask = xp.asarray(rng.random((parts, pm)) < 0.9)
            tdesc = part_descriptors(pts + 1.5, mask, anchors)
            pj = xp.asarray(rng.normal(size=(parts, pm, 2, n_params)).astype(dtype))
            a = timed(lambda: prdl_loss_and_grad(pts, mask, tdesc, anchors))
            b = timed(lambda: gauss_newton_terms(pts, mask, tdesc, anchors))
            terms = gauss_newton_terms(pts, mask, tdesc, anchors)
            c = timed(lambda: normal_equations(pj, terms))
            rows.append((n, pm, a, b, c))
    return rows


if __name__ == "__main__":  # pragma: no cover
    import os
    import sys

    mods = [("numpy", np)] + ([("cupy", _cupy)] if _cupy is not None else [])
    print(f"PRDL timings, {8} parts, median ms (OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})")
    for name, mod in mods:
        for dt in (np.float32, np.float64):
            print(f"\n{name} {np.dtype(dt).name}\n| anchors | points/part | loss+grad | GN terms | normal eq. (59 params) |")
            print("| --- | --- | --- | --- | --- |")
            for n, pm, a, b, c in _bench(mod, dt, reps=int(sys.argv[1]) if len(sys.argv) > 1 else 30):
                print(f"| {n}x{n} | {pm} | {a:.2f} | {b:.2f} | {c:.2f} |")
