"""Vectorised NumPy triangle rasteriser with a z-buffer, part-label images and vertex visibility.

Pixel convention (the project's OpenCV convention): pixel (row r, col c) is sampled at its centre,
the point (x = c, y = r); y points down. Vertices come as (V, 3): [:, :2] pixel coordinates and
[:, 2] a depth where larger is farther (e.g. camera-frame z). Depth is interpolated linearly in
screen space (exact for orthographic projection; for perspective it is the usual approximation,
pass 1/z negated for exact perspective ordering). No clipping: triangles are expected in front of
the camera; triangles with non-finite coordinates are skipped.

* ``rasterize``: face id per pixel (-1 empty), optionally the depth buffer;
* ``label_image``: per-pixel part label of the covering triangle;
* ``visible_vertices``: vertices of triangles that own at least one pixel (optionally also those
  passing a depth test against the buffer);
* ``vertex_visibility_splat``: a cheap per-frame visibility test without triangles: vertices splat
  their depth into a coarse grid (np.minimum.at), a vertex is visible if it is within a tolerance
  of its cell's nearest depth.
"""
from __future__ import annotations

import numpy as np

__all__ = ["rasterize", "face_labels", "label_image", "render_labels", "visible_vertices",
           "vertex_visibility_splat"]

_INSIDE_TOL = 1e-7  # barycentric slack so shared edges leave no cracks


def _setup(verts_px: np.ndarray, faces: np.ndarray, H: int, W: int):
    """Per-triangle pixel bounding boxes and affine (x, y) -> (l1, l2, z) coefficients."""
    v = np.asarray(verts_px, np.float64)
    f = np.asarray(faces, np.int64)
    x = v[:, 0][f]
    y = v[:, 1][f]
    z = v[:, 2][f]
    x0, x1, x2 = x.T
    y0, y1, y2 = y.T
    z0, z1, z2 = z.T
    area2 = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    with np.errstate(invalid="ignore"):
        xmin = np.ceil(x.min(1))
        xmax = np.floor(x.max(1))
        ymin = np.ceil(y.min(1))
        ymax = np.floor(y.max(1))
        ok = (np.isfinite(area2) & np.isfinite(z).all(1) & (np.abs(area2) > 1e-12)
              & (xmax >= 0) & (ymax >= 0) & (xmin <= W - 1) & (ymin <= H - 1))
    ids = np.nonzero(ok)[0]
    xmin = np.clip(xmin[ids], 0, W - 1).astype(np.int64)
    xmax = np.clip(xmax[ids], 0, W - 1).astype(np.int64)
    ymin = np.clip(ymin[ids], 0, H - 1).astype(np.int64)
    ymax = np.clip(ymax[ids], 0, H - 1).astype(np.int64)
    keep = (xmax >= xmin) & (ymax >= ymin)
    ids, xmin, xmax, ymin, ymax = ids[keep], xmin[keep], xmax[keep], ymin[keep], ymax[keep]
    x0, x1, x2, y0, y1, y2, z0, z1, z2 = (a[ids] for a in (x0, x1, x2, y0, y1, y2, z0, z1, z2))
    inv = 1.0 / area2[ids]
    a1, b1 = (y2 - y0) * inv, -(x2 - x0) * inv
    a2, b2 = -(y1 - y0) * inv, (x1 - x0) * inv
    c1 = -(a1 * x0 + b1 * y0)
    c2 = -(a2 * x0 + b2 * y0)
    dz1, dz2 = z1 - z0, z2 - z0
    coef = np.stack([a1, b1, c1, a2, b2, c2, a1 * dz1 + a2 * dz2, b1 * dz1 + b2 * dz2,
                     z0 + c1 * dz1 + c2 * dz2], 1)
    return ids, xmin, ymin, xmax - xmin + 1, ymax - ymin + 1, coef


def rasterize(verts_px, faces, H: int, W: int, *, return_depth: bool = False,
              max_candidates: int = 1 << 21):
    """Z-buffered coverage: (face_id (H, W) int32, -1 where empty[, depth (H, W) float64, inf empty]).

    Every triangle is tested at the pixel centres of its bounding box (vectorised over all
    triangles, in chunks of at most ``max_candidates`` tests); the nearest covering sample wins.
    """
    H, W = int(H), int(W)
    ids, x0, y0, bw, bh, coef = _setup(verts_px, faces, H, W)
    cnt = bw * bh
    # chunk boundaries so that each chunk tests at most max_candidates pixels
    csum = np.cumsum(cnt)
    cuts = [0]
    if len(csum):
        while cuts[-1] < len(csum):
            done = csum[cuts[-1] - 1] if cuts[-1] else 0
            nxt = int(np.searchsorted(csum, done + max_candidates, side="right"))
            cuts.append(max(nxt, cuts[-1] + 1))
    pix_l, z_l, t_l = [], [], []
    for s, e in zip(cuts[:-1], cuts[1:]):
        c = cnt[s:e]
        total = int(c.sum())
        tri = np.repeat(np.arange(s, e), c)
        start = np.repeat(np.cumsum(c) - c, c)
        local = np.arange(total) - start
        w_t = bw[tri]
        py = local // w_t
        px = local - py * w_t
        px += x0[tri]
        py += y0[tri]
        cf = coef[tri]
        fx = px.astype(np.float64)
        fy = py.astype(np.float64)
        l1 = cf[:, 0] * fx + cf[:, 1] * fy + cf[:, 2]
        l2 = cf[:, 3] * fx + cf[:, 4] * fy + cf[:, 5]
        inside = (l1 >= -_INSIDE_TOL) & (l2 >= -_INSIDE_TOL) & (l1 + l2 <= 1.0 + _INSIDE_TOL)
        sel = np.nonzero(inside)[0]
        cs = cf[sel]
        pix_l.append(py[sel] * W + px[sel])
        z_l.append(cs[:, 6] * fx[sel] + cs[:, 7] * fy[sel] + cs[:, 8])
        t_l.append(tri[sel])
    face_id = np.full(H * W, -1, np.int32)
    zbuf = np.full(H * W, np.inf)
    if pix_l:
        pix = np.concatenate(pix_l)
        zs = np.concatenate(z_l)
        tri = np.concatenate(t_l)
        np.minimum.at(zbuf, pix, zs)
        win = zs <= zbuf[pix]
        face_id[pix[win]] = ids[tri[win]]
    face_id = face_id.reshape(H, W)
    return (face_id, zbuf.reshape(H, W)) if return_depth else face_id


def face_labels(faces, vertex_labels) -> np.ndarray:
    """(F,) label per triangle: the majority of its vertices' labels, else its first vertex's."""
    lab = np.asarray(vertex_labels)[np.asarray(faces)]
    l0, l1, l2 = lab[:, 0], lab[:, 1], lab[:, 2]
    return np.where((l1 == l2) & (l0 != l1), l1, l0)


def label_image(face_id, faces, vertex_labels) -> np.ndarray:
    """(H, W) int8 part label of each pixel's covering triangle (-1 where no triangle / no label)."""
    fl = face_labels(faces, vertex_labels).astype(np.int8)
    fid = np.asarray(face_id)
    return np.where(fid >= 0, fl[np.maximum(fid, 0)], np.int8(-1)).astype(np.int8)


def render_labels(verts_px, faces, vertex_labels, H: int, W: int) -> np.ndarray:
    """Rasterise and label in one call: (H, W) int8 part labels (-1 none)."""
    return label_image(rasterize(verts_px, faces, H, W), faces, vertex_labels)


def visible_vertices(verts_px, face_id, faces, *, depth=None, tol: float = 0.0) -> np.ndarray:
    """(V,) bool: vertices of triangles that own at least one pixel of ``face_id``.

    With ``depth`` (the buffer from ``rasterize(..., return_depth=True)``), a vertex that lands
    inside the image with depth <= buffer depth at its nearest pixel + ``tol`` is visible too (this
    catches vertices whose triangles are all smaller than a pixel).
    """
    v = np.asarray(verts_px)
    f = np.asarray(faces)
    fid = np.asarray(face_id).reshape(-1)
    hit = np.zeros(len(f), bool)
    hit[fid[fid >= 0]] = True
    vis = np.zeros(len(v), bool)
    vis[f[hit].reshape(-1)] = True
    if depth is not None:
        dep = np.asarray(depth)
        H, W = dep.shape
        with np.errstate(invalid="ignore"):
            c = np.rint(v[:, 0])
            r = np.rint(v[:, 1])
            ok = (c >= 0) & (c <= W - 1) & (r >= 0) & (r <= H - 1)
        ci = np.where(ok, c, 0).astype(np.int64)
        ri = np.where(ok, r, 0).astype(np.int64)
        vis |= ok & (v[:, 2] <= dep[ri, ci] + tol)
    return vis


def vertex_visibility_splat(verts_px, H: int, W: int, radius: float = 2.0, tol=0.5, *,
                            layers=None, layer_tol: float = 0.0, neighbourhood: bool = False) -> np.ndarray:
    """(V,) bool: cheap visibility from a point-splat z-buffer (no triangles).

    The image is divided into cells of ``radius`` x ``radius`` pixels; each vertex splats its depth
    into its cell with ``np.minimum.at``; a vertex is visible if its depth is within ``tol`` (depth
    units, e.g. cm for camera z; scalar or (V,)) of its cell's nearest depth. Vertices outside the
    image are invisible. ``radius`` should be about the vertex spacing in pixels (smaller cells let
    occluded vertices through the gaps between occluder vertices); ``tol`` must stay above the
    depth change of one surface across a cell and below the depth gap to what it hides.

    ``layers`` (V,) small ints separate surfaces that touch (the face skin and the eyeballs): each
    layer has its own buffer; a vertex must pass ``tol`` against its own layer and ``layer_tol``
    against every other layer (so a closed eyelid, a few millimetres in front of the cornea,
    hides it, while the cornea's own curvature does not). With ``neighbourhood`` the nearest depth
    is taken over the 3 x 3 cells around each cell.
    """
    v = np.asarray(verts_px)
    cell = float(radius)
    gw = max(int(np.ceil(W / cell)), 1)
    gh = max(int(np.ceil(H / cell)), 1)
    nc = gh * gw
    with np.errstate(invalid="ignore"):
        gx = np.floor((v[:, 0] + 0.5) / cell)
        gy = np.floor((v[:, 1] + 0.5) / cell)
        ok = (gx >= 0) & (gx < gw) & (gy >= 0) & (gy < gh) & np.isfinite(v[:, 2])
    idx = (np.where(ok, gy, 0) * gw + np.where(ok, gx, 0)).astype(np.int64)
    z = np.where(ok, v[:, 2], np.inf)
    if layers is None:
        lay = np.zeros(len(v), np.int64)
        nl = 1
    else:
        lay = np.asarray(layers, np.int64)
        nl = int(lay.max()) + 1 if len(lay) else 1
    zb = np.full(nl * nc, np.inf)
    np.minimum.at(zb, lay * nc + idx, z)
    zb = zb.reshape(nl, gh, gw)
    if neighbourhood:
        p = np.pad(zb, ((0, 0), (1, 1), (1, 1)), constant_values=np.inf)
        m = zb.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(m, p[:, dy:dy + gh, dx:dx + gw], out=m)
        zb = m
    zb = zb.reshape(nl, nc)
    vis = ok & (z <= zb[lay, idx] + tol)
    for k in range(nl if nl > 1 else 0):
        other = lay != k
        vis[other] &= z[other] <= zb[k, idx[other]] + layer_tol
    return vis


# ------------------------------------------------------------------ benchmark: python -m engine.raster

def _face_report(sizes=(128, 224), reps: int = 10) -> None:  # pragma: no cover - needs the assets
    """Timings and splat-vs-raster visibility agreement on the ICT tracking mesh."""
    import time

    from engine.face_model import FaceModel
    from engine.geometry import FLIP, Camera, euler_to_matrix

    m = FaceModel.load()
    nf = m.n_face_vertices
    layers = (np.arange(m.n_vertices) >= nf).astype(np.int64)
    tol = 0.5
    eye = np.arange(nf, m.n_vertices)
    v0 = m.vertices()
    centre = 0.5 * (v0.min(0) + v0.max(0))
    blink = m.exp_names.index("eyeBlink_L"), m.exp_names.index("eyeBlink_R")
    poses = [(0, 0, 0.0), (0, 0, 1.0), (30, 0, 0.0), (-45, 10, 0.0), (60, -10, 0.0), (0, 25, 1.0), (-20, -20, 0.0)]

    def project(verts, size, yaw, pitch):
        f = size * 60.0 / 32.0
        cam = Camera(f, f, (size - 1) / 2, (size - 1) / 2, size, size)
        pc = (verts - centre) @ (FLIP @ euler_to_matrix(yaw, pitch, 0.0)).T + np.array([0.0, 0.0, 60.0])
        return np.concatenate([cam.project(pc), pc[:, 2:]], 1)

    def best_ms(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    print("| size | yaw, pitch, blink | raster ms | splat ms | splat = raster 1x | splat = raster 4x | "
          "raster 1x = 4x | eyeball verts visible: raster 1x / splat / raster 4x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        for yaw, pitch, b in poses:
            e = np.zeros(m.n_exp, np.float32)
            e[list(blink)] = b
            verts = m.vertices(None, e)
            vp = project(verts, size, yaw, pitch)
            vh = project(verts, 4 * size, yaw, pitch)
            fid, dep = rasterize(vp, m.faces, size, size, return_depth=True)
            r1 = visible_vertices(vp, fid, m.faces, depth=dep, tol=0.1)
            r4 = visible_vertices(vh, rasterize(vh, m.faces, 4 * size, 4 * size), m.faces)
            s = vertex_visibility_splat(vp, size, size, 2.0, tol, layers=layers)
            t_r = best_ms(lambda: rasterize(vp, m.faces, size, size))
            t_s = best_ms(lambda: vertex_visibility_splat(vp, size, size, 2.0, tol, layers=layers))
            print(f"| {size} | {yaw}, {pitch}, {b:g} | {t_r:.1f} | {t_s:.2f} | {100 * (s == r1).mean():.1f}% | "
                  f"{100 * (s == r4).mean():.1f}% | {100 * (r1 == r4).mean():.1f}% | "
                  f"{r1[eye].sum()} / {s[eye].sum()} / {r4[eye].sum()} |")


if __name__ == "__main__":  # pragma: no cover
    _face_report()
