"""Derived topology data for the ICT-FaceKit model, computed once from the assets and cached.

What is derived (all from data, no hand-typed vertex lists):

* the *tracking mesh*: ICT's ``face`` region plus both eyeballs, re-indexed;
* a dense correspondence from MediaPipe's 478 face-mesh landmarks onto that mesh
  (triangle + barycentric weights), obtained by aligning MediaPipe's canonical face model
  to ICT (similarity from semantic point pairs, then closest-point refinement with a
  similarity transform and a regularised fit of ICT identity and expression coefficients);
* per-vertex PRDL part labels on the tracking mesh (8 parts, see ``PART_NAMES``), by testing
  vertices in a frontal (x, y) projection against MediaPipe's contours carried onto ICT;
* eyeball centres (neutral + linear identity model) and iris geometry.

Conventions: ICT units are cm, +x = subject's left, +y up, +z forward. MediaPipe's canonical
model uses the same axes (its ``left_*`` contours are the subject's left, at x > 0).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.spatial import cKDTree

from engine.assets import derived_cache, file_digest, find_asset

VERSION = 4  # bump when the derivation changes; part of the cache key

PART_NAMES = ("left_eye", "right_eye", "left_brow", "right_brow", "upper_lip", "lower_lip", "nose", "skin")

ICT_ASSET = "ict_facekit/ict_face_model.npz"
MP_OBJ_ASSET = "mediapipe/face_model_with_iris.obj"
MP_CONTOURS_ASSET = "mediapipe/face_mesh_contours.json"
MP_INDICES_ASSET = "mediapipe/canonical_face_model_landmarks_indices.txt"

TRACKING_REGIONS = ("face", "eyeball_left", "eyeball_right")

# Semantic point pairs for the initial similarity: MediaPipe landmark -> ICT 68-point index.
# MediaPipe 33/133 are the subject's RIGHT eye (x < 0), as are 68-pt 36/39.
SEED_PAIRS = ((33, 36), (133, 39), (362, 42), (263, 45), (61, 48), (291, 54), (4, 30), (152, 8))

# Mouth opening used when labelling the lips (lips separated so upper/lower are distinct).
LIP_LABEL_JAW_OPEN = 0.3
# Displacement fraction separating moving from still vertices (jawOpen for lips, eyeBlink for lids).
JAW_FRACTION = 0.4
LID_FRACTION = 0.3
# Regularisation of the shape fit (cm^2 per unit coefficient^2) and fitted identity modes.
ID_REG = 2.0
EXP_REG = 2.0
N_ID_FIT = 60
ICP_ITERS = 12
# Pair closure refinement: weight (per cm^2 of gap) and search radius (cm), see ``_close_pairs``.
PAIR_BETA = 4.0
PAIR_RADIUS = 0.35


# ------------------------------------------------------------------ readers

def read_obj_vertices(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (N,3) float64, triangles (M,3) 0-based) of a Wavefront OBJ (triangles only)."""
    verts, faces = [], []
    with open(path) as fh:
        for line in fh:
            p = line.split()
            if not p:
                continue
            if p[0] == "v":
                verts.append([float(x) for x in p[1:4]])
            elif p[0] == "f":
                idx = [int(x.split("/")[0]) - 1 for x in p[1:]]
                for k in range(1, len(idx) - 1):
                    faces.append([idx[0], idx[k], idx[k + 1]])
    return np.asarray(verts, np.float64), np.asarray(faces, np.int64)


def read_index_groups(path: Path) -> dict[str, list[int]]:
    """The Python-style ``name = [..]`` lists of canonical_face_model_landmarks_indices.txt."""
    text = Path(path).read_text()
    out = {}
    for name, body in re.findall(r"(\w+)\s*=\s*\[([^\]]*)\]", text):
        out[name] = [int(x) for x in re.findall(r"\d+", body)]
    return out


def _components(edges: list[list[int]]) -> list[dict[int, list[int]]]:
    adj: dict[int, list[int]] = defaultdict(list)
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen, comps = set(), []
    for s in adj:
        if s in seen:
            continue
        stack, comp = [s], {}
        seen.add(s)
        while stack:
            x = stack.pop()
            comp[x] = adj[x]
            for y in adj[x]:
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
        comps.append(comp)
    return comps


def _walk(comp: dict[int, list[int]]) -> list[int]:
    """Ordered vertices of a simple path or cycle given as an adjacency dict."""
    ends = [v for v, n in comp.items() if len(n) == 1]
    start = ends[0] if ends else min(comp)
    order, prev, cur = [start], None, start
    while True:
        nxt = [y for y in comp[cur] if y != prev]
        if not nxt or (nxt[0] == start) or len(order) > len(comp):
            break
        prev, cur = cur, nxt[0]
        if cur == start:
            break
        order.append(cur)
    return order


def contour_geometry(contours: dict, mp_xyz: np.ndarray) -> dict[str, list[int]]:
    """Ordered MediaPipe contours: closed loops and their upper/lower halves, brow polylines.

    Returns keys (all index lists into the 478 landmarks):
    ``{left,right}_eye`` loop, ``{left,right}_eye_upper/lower`` (without the two corners),
    ``lips_outer`` / ``lips_inner`` loops and their ``_upper``/``_lower`` halves (corners included
    at both ends), ``{left,right}_brow_upper/lower`` polylines ordered lateral -> medial,
    ``face_oval`` loop, and ``*_corners``.
    """
    out: dict[str, list[int]] = {}

    def halves(loop: list[int]) -> tuple[list[int], list[int], tuple[int, int]]:
        x = mp_xyz[loop, 0]
        i0, i1 = int(np.argmin(x)), int(np.argmax(x))
        n = len(loop)
        a = [loop[(i0 + k) % n] for k in range((i1 - i0) % n + 1)]
        b = [loop[(i1 + k) % n] for k in range((i0 - i1) % n + 1)][::-1]
        if mp_xyz[a[1:-1], 1].mean() > mp_xyz[b[1:-1], 1].mean():
            upper, lower = a, b
        else:
            upper, lower = b, a
        return upper, lower, (loop[i0], loop[i1])

    for side in ("left", "right"):
        (comp,) = _components(contours[f"{side}_eye"])
        loop = _walk(comp)
        up, lo, corners = halves(loop)
        out[f"{side}_eye"] = loop
        out[f"{side}_eye_upper"] = up[1:-1]
        out[f"{side}_eye_lower"] = lo[1:-1]
        out[f"{side}_eye_corners"] = list(corners)
        lines = [_walk(c) for c in _components(contours[f"{side}_eyebrow"])]
        lines.sort(key=lambda l: -mp_xyz[l, 1].mean())  # upper first
        for name, line in zip(("upper", "lower"), lines):
            if abs(mp_xyz[line[0], 0]) < abs(mp_xyz[line[-1], 0]):
                line = line[::-1]  # lateral -> medial
            out[f"{side}_brow_{name}"] = line
    lip_loops = [_walk(c) for c in _components(contours["lips"])]
    # the outer loop encloses the inner one: larger extent in x
    lip_loops.sort(key=lambda l: -np.ptp(mp_xyz[l, 0]))
    for name, loop in zip(("outer", "inner"), lip_loops):
        up, lo, corners = halves(loop)
        out[f"lips_{name}"] = loop
        out[f"lips_{name}_upper"] = up
        out[f"lips_{name}_lower"] = lo
        out[f"lips_{name}_corners"] = list(corners)
    (comp,) = _components(contours["face_oval"])
    out["face_oval"] = _walk(comp)
    return out


# ------------------------------------------------------------------ geometry helpers

def points_in_polygon(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd test of 2D points (N,2) against a closed polygon (M,2)."""
    x, y = pts[:, 0:1], pts[:, 1:2]
    x0, y0 = poly[:, 0][None], poly[:, 1][None]
    x1, y1 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (crosses & (x < xi)).sum(1) % 2 == 1


def star_polygon(pts2: np.ndarray) -> np.ndarray:
    """Order points into a polygon by angle around their centroid (for star-shaped outlines)."""
    c = pts2.mean(0)
    return np.argsort(np.arctan2(pts2[:, 1] - c[1], pts2[:, 0] - c[0]))


def similarity_transform(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None):
    """Weighted least-squares (s, R, t) with dst ~ s R src + t (Umeyama)."""
    w = np.ones(len(src)) if w is None else np.asarray(w, np.float64)
    W = w.sum()
    ms, md = (w[:, None] * src).sum(0) / W, (w[:, None] * dst).sum(0) / W
    X, Y = src - ms, dst - md
    S = (w[:, None] * Y).T @ X / W
    U, D, Vt = np.linalg.svd(S)
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ np.diag(d) @ Vt
    var = (w * (X**2).sum(1)).sum() / W
    s = float((D * d).sum() / var)
    t = md - s * R @ ms
    return s, R, t


def _closest_on_triangles(p, a, b, c):
    """Closest points of p on triangles (a, b, c), all (K,3). Returns (q, bary (K,3), dist)."""
    ab, ac, ap = b - a, c - a, p - a
    d00, d01, d11 = (ab * ab).sum(1), (ab * ac).sum(1), (ac * ac).sum(1)
    d20, d21 = (ap * ab).sum(1), (ap * ac).sum(1)
    den = d00 * d11 - d01 * d01
    ok = den > 1e-20
    den = np.where(ok, den, 1.0)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    u = 1.0 - v - w
    inside = ok & (u >= 0) & (v >= 0) & (w >= 0)
    bary = np.stack([u, v, w], 1)
    q = a + v[:, None] * ab + w[:, None] * ac
    dist = np.where(inside, np.linalg.norm(p - q, axis=1), np.inf)
    corners = (a, b, c)
    for i, j in ((0, 1), (1, 2), (2, 0)):
        e = corners[j] - corners[i]
        ee = np.maximum((e * e).sum(1), 1e-20)
        t = np.clip(((p - corners[i]) * e).sum(1) / ee, 0.0, 1.0)
        qe = corners[i] + t[:, None] * e
        de = np.linalg.norm(p - qe, axis=1)
        better = de < dist
        if better.any():
            be = np.zeros((len(p), 3))
            be[:, i] = 1.0 - t
            be[:, j] = t
            dist = np.where(better, de, dist)
            q = np.where(better[:, None], qe, q)
            bary = np.where(better[:, None], be, bary)
    return q, bary, dist


def closest_points_on_mesh(points: np.ndarray, verts: np.ndarray, tris: np.ndarray):
    """Exact closest point on a triangle set for each point.

    Returns (tri_index (P,) into ``tris``, bary (P,3), q (P,3), dist (P,)). Candidate triangles
    are those with a vertex within (nearest-vertex distance + longest edge): a superset of the
    triangles that can hold the closest point.
    """
    points = np.asarray(points, np.float64)
    verts = np.asarray(verts, np.float64)
    used = np.unique(tris)
    tree = cKDTree(verts[used])
    d0, _ = tree.query(points)
    tv = verts[tris]
    lmax = np.linalg.norm(tv - np.roll(tv, 1, axis=1), axis=2).max()
    # vertex -> incident triangles
    order = np.argsort(tris.ravel(), kind="stable")
    tri_of = order // 3
    starts = np.searchsorted(tris.ravel()[order], np.arange(len(verts) + 1))
    pi, ti = [], []
    for k, nb in enumerate(tree.query_ball_point(points, d0 + lmax + 1e-9)):
        vids = used[nb]
        cand = np.unique(np.concatenate([tri_of[starts[v]:starts[v + 1]] for v in vids]))
        pi.append(np.full(len(cand), k))
        ti.append(cand)
    pi, ti = np.concatenate(pi), np.concatenate(ti)
    q, bary, dist = _closest_on_triangles(points[pi], tv[ti, 0], tv[ti, 1], tv[ti, 2])
    best = np.full(len(points), np.inf)
    np.minimum.at(best, pi, dist)
    sel = np.nonzero(dist <= best[pi])[0]
    # first minimum per point
    _, first = np.unique(pi[sel], return_index=True)
    sel = sel[first]
    return ti[sel], bary[sel], q[sel], dist[sel]


def _box_lsq(A, b, lb, ub, x0):
    """min |A x - b|^2 subject to lb <= x <= ub (small dense problem; L-BFGS-B on the normal form)."""
    H, g = A.T @ A, A.T @ b
    res = minimize(lambda x: (0.5 * x @ H @ x - g @ x, H @ x - g), np.clip(x0, lb, ub), jac=True,
                   method="L-BFGS-B", bounds=list(zip(lb, ub)), options=dict(maxiter=2000, ftol=1e-15, gtol=1e-10))
    return res.x


def fit_sphere(p: np.ndarray) -> tuple[np.ndarray, float]:
    A = np.c_[2 * p, np.ones(len(p))]
    x = np.linalg.lstsq(A, (p**2).sum(1), rcond=None)[0]
    c = x[:3]
    return c, float(np.sqrt(x[3] + c @ c))


def vertex_normals(verts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    fn = np.cross(verts[tris[:, 1]] - verts[tris[:, 0]], verts[tris[:, 2]] - verts[tris[:, 0]])
    n = np.zeros_like(verts)
    for k in range(3):
        np.add.at(n, tris[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------ the derivation

def _region(m, name: str) -> tuple[int, int]:
    names = [str(x) for x in m["region_names"]]
    a, b = m["region_vertex_ranges"][names.index(name)]
    return int(a), int(b)


def _region_faces(m, name: str) -> tuple[int, int]:
    names = [str(x) for x in m["region_names"]]
    a, b = m["region_face_ranges"][names.index(name)]
    return int(a), int(b)


def _subregion(m, name: str) -> tuple[int, int]:
    names = [str(x) for x in m["subregion_names"]]
    a, b = m["subregion_vertex_ranges"][names.index(name)]
    return int(a), int(b)


def tracking_mesh(m) -> tuple[np.ndarray, np.ndarray]:
    """(vertex_index into the full mesh, triangles re-indexed to the tracking mesh)."""
    vidx, fl = [], []
    for r in TRACKING_REGIONS:
        a, b = _region(m, r)
        vidx.append(np.arange(a, b))
        fa, fb = _region_faces(m, r)
        fl.append(m["faces"][fa:fb])
    vidx = np.concatenate(vidx)
    remap = np.full(len(m["neutral"]), -1, np.int64)
    remap[vidx] = np.arange(len(vidx))
    faces = remap[np.concatenate(fl)]
    assert (faces >= 0).all(), "tracking mesh triangles reference vertices outside it"
    return vidx.astype(np.int32), faces.astype(np.int32)


def derive(ict_path: Path, mp_obj_path: Path, contours_path: Path, indices_path: Path,
           verbose: bool = False) -> dict[str, np.ndarray]:
    log = print if verbose else (lambda *a, **k: None)
    with np.load(ict_path) as z:  # compressed npz: read every array once
        m = {k: z[k] for k in z.files}
    exp_names = [str(x) for x in m["exp_names"]]
    vidx, tfaces = tracking_mesh(m)
    V = len(vidx)
    neutral = m["neutral"][vidx].astype(np.float64)
    id_basis = m["id_basis"][:, vidx].astype(np.float64)
    exp_basis = m["exp_basis"][:, vidx].astype(np.float64)
    fa, fb = _region(m, "face")
    n_face = fb - fa
    assert fa == 0 and vidx[n_face - 1] == n_face - 1
    face_tris = tfaces[np.all(tfaces < n_face, axis=1)]
    lm68 = m["landmarks_multipie68"].astype(np.int64)  # face-region vertices, same index in tracking mesh
    assert (lm68 < n_face).all()

    mp, _ = read_obj_vertices(mp_obj_path)
    assert mp.shape == (478, 3), mp.shape
    contours = json.loads(Path(contours_path).read_text())
    groups = read_index_groups(indices_path)
    cg = contour_geometry(contours, mp)

    # ---- ICT vertex groups from the expression shapes (moving vs still)
    def disp(name):
        return np.linalg.norm(exp_basis[exp_names.index(name)], axis=1)

    jaw = disp("jawOpen")
    jaw_moving = jaw > JAW_FRACTION * jaw[:n_face].max()
    lid_up = {}
    for side, sfx in (("left", "_L"), ("right", "_R")):
        # the upper lid is what a blink moves *down*; the lower lid also slides medially a little
        down = -exp_basis[exp_names.index("eyeBlink" + sfx), :, 1]
        lid_up[side] = down > LID_FRACTION * down[:n_face].max()
    tri_sets = {"all": face_tris}
    tri_sets["lip_upper"] = face_tris[~jaw_moving[face_tris].any(1)]
    tri_sets["lip_lower"] = face_tris[jaw_moving[face_tris].all(1)]
    for side in ("left", "right"):
        tri_sets[f"lid_upper_{side}"] = face_tris[lid_up[side][face_tris].all(1)]
        tri_sets[f"lid_lower_{side}"] = face_tris[~lid_up[side][face_tris].any(1)]

    # ---- which MediaPipe face point is matched against which triangle set
    mp_group = np.array(["all"] * 468, dtype=object)
    mp2 = mp[:, :2]
    upper_poly = cg["lips_outer_upper"] + cg["lips_inner_upper"][::-1]
    lower_poly = cg["lips_outer_lower"] + cg["lips_inner_lower"][::-1]
    in_up = points_in_polygon(mp2[:468], mp2[upper_poly])
    in_lo = points_in_polygon(mp2[:468], mp2[lower_poly])
    corners = set(cg["lips_outer_corners"]) | set(cg["lips_inner_corners"])
    for i in np.nonzero(in_up)[0]:
        mp_group[i] = "lip_upper"
    for i in np.nonzero(in_lo)[0]:
        mp_group[i] = "lip_lower"
    for i in cg["lips_outer_upper"] + cg["lips_inner_upper"]:
        mp_group[i] = "lip_upper"
    for i in cg["lips_outer_lower"] + cg["lips_inner_lower"]:
        mp_group[i] = "lip_lower"
    for i in corners:
        mp_group[i] = "all"
    for side in ("left", "right"):
        for i in cg[f"{side}_eye_upper"]:
            mp_group[i] = f"lid_upper_{side}"
        for i in cg[f"{side}_eye_lower"]:
            mp_group[i] = f"lid_lower_{side}"

    def correspond(X, shape):
        """Closest point of each of X (468,3) on ``shape`` honouring the point groups."""
        tri = np.zeros((468, 3), np.int64)
        bary = np.zeros((468, 3))
        q = np.zeros((468, 3))
        dist = np.zeros(468)
        for g, tris in tri_sets.items():
            sel = np.nonzero(mp_group == g)[0]
            if len(sel) == 0:
                continue
            ti, b, qq, dd = closest_points_on_mesh(X[sel], shape, tris)
            tri[sel], bary[sel], q[sel], dist[sel] = tris[ti], b, qq, dd
        return tri, bary, q, dist

    # ---- 1. initial similarity from semantic pairs
    src = mp[[a for a, _ in SEED_PAIRS]]
    dst = neutral[lm68[[b for _, b in SEED_PAIRS]]]
    s, R, t = similarity_transform(src, dst)
    seed_res = np.linalg.norm(s * src @ R.T + t - dst, axis=1)
    log(f"seed similarity: scale {s:.4f}, pair residual mean {seed_res.mean():.3f} max {seed_res.max():.3f} cm")

    # ---- 2. ICP: similarity + regularised identity/expression fit
    n_id = min(N_ID_FIT, id_basis.shape[0])
    coef = np.zeros(n_id + exp_basis.shape[0])
    basis = np.concatenate([id_basis[:n_id], exp_basis], 0)  # (K, V, 3)
    lb = np.r_[np.full(n_id, -4.0), np.zeros(exp_basis.shape[0])]
    ub = np.r_[np.full(n_id, 4.0), np.ones(exp_basis.shape[0])]
    reg = np.sqrt(np.r_[np.full(n_id, ID_REG), np.full(exp_basis.shape[0], EXP_REG)])
    A_face = mp[:468]
    shape = neutral.copy()
    rigid_stats = None
    for it in range(ICP_ITERS):
        X = s * A_face @ R.T + t
        tri, bary, q, dist = correspond(X, shape)
        if it == 0:
            rigid_stats = (dist.mean(), dist.max())
        # robust weights: down-weight far outliers
        med = np.median(dist)
        w = (dist < max(5.0 * med, 0.5)).astype(np.float64)
        s, R, t = similarity_transform(A_face, q, w)
        X = s * A_face @ R.T + t
        # shape update with the correspondence fixed: q(c) = sum_k bary_k (neutral + basis @ c)
        B = np.einsum("pk,jpkd->pdj", bary, basis[:, tri])  # (468, 3, K)
        q0 = np.einsum("pk,pkd->pd", bary, neutral[tri])
        sw = np.sqrt(w)[:, None, None]
        A_mat = np.concatenate([(sw * B).reshape(-1, B.shape[2]), np.diag(reg)], 0)
        b_vec = np.concatenate([((X - q0) * sw[:, :, 0]).ravel(), np.zeros(len(reg))])
        coef = _box_lsq(A_mat, b_vec, lb, ub, coef)
        shape = neutral + np.tensordot(coef, basis, 1)
        log(f"icp {it}: scale {s:.4f} dist mean {dist.mean():.4f} max {dist.max():.4f}")
    X = s * A_face @ R.T + t
    tri, bary, q, dist = correspond(X, shape)
    log(f"final: residual mean {dist.mean():.4f} median {np.median(dist):.4f} max {dist.max():.4f} cm")
    # ---- 2b. lid and inner-lip pairs: where the correspondence is ambiguous by ~0.1 cm, prefer
    # positions that meet when the model closes them (eyeBlink=1 for the lids; neutral, where ICT's
    # lips touch, for the inner lip contour), while staying close to the aligned MediaPipe point.
    id_only = neutral + np.tensordot(coef[:n_id], basis[:n_id], 1)
    pair_specs = []
    for side, sfx in (("left", "_L"), ("right", "_R")):
        e_close = np.zeros(exp_basis.shape[0])
        e_close[exp_names.index("eyeBlink" + sfx)] = 1.0
        pair_specs.append((list(zip(cg[f"{side}_eye_upper"], cg[f"{side}_eye_lower"])),
                           id_only + np.tensordot(e_close, exp_basis, 1)))
    pair_specs.append((list(zip(cg["lips_inner_upper"][1:-1], cg["lips_inner_lower"][1:-1])), id_only))
    moved = []
    for pairs, closed in pair_specs:
        for u, lo in pairs:
            cu = _candidates(q[u], tri_sets[mp_group[u]], shape, PAIR_RADIUS, (tri[u], bary[u]))
            cl = _candidates(q[lo], tri_sets[mp_group[lo]], shape, PAIR_RADIUS, (tri[lo], bary[lo]))
            du = ((_at(shape, *cu) - X[u]) ** 2).sum(1)
            dl = ((_at(shape, *cl) - X[lo]) ** 2).sum(1)
            gap = ((_at(closed, *cu)[:, None] - _at(closed, *cl)[None]) ** 2).sum(2)
            cost = du[:, None] + dl[None] + PAIR_BETA * gap
            iu, il = np.unravel_index(np.argmin(cost), cost.shape)
            for k, c, i in ((u, cu, iu), (lo, cl, il)):
                tri[k], bary[k] = c[0][i], c[1][i]
                q[k] = _at(shape, tri[k][None], bary[k][None])[0]
                moved.append(np.linalg.norm(q[k] - X[k]) - dist[k])
                dist[k] = np.linalg.norm(q[k] - X[k])
    log(f"pair refinement: residual change of {len(moved)} points: mean {np.mean(moved):+.4f} "
        f"max {np.max(moved):+.4f} cm; residual now mean {dist.mean():.4f} max {dist.max():.4f} cm")
    id_fit = np.zeros(id_basis.shape[0])
    id_fit[:n_id] = coef[:n_id]
    exp_fit = coef[n_id:]
    log("fitted expressions:", {exp_names[k]: round(float(v), 3) for k, v in enumerate(exp_fit) if v > 0.02})

    # ---- 3. iris landmarks on the eyeballs
    extra = [str(x) for x in m["extra_exp_names"]]
    lm_tri = np.zeros((478, 3), np.int64)
    lm_bary = np.zeros((478, 3))
    lm_tri[:468], lm_bary[:468] = tri, bary
    remap = np.full(len(m["neutral"]), -1, np.int64)
    remap[vidx] = np.arange(V)
    eye_centre_id = np.zeros((id_basis.shape[0], 2, 3))
    eye_centre = np.zeros((2, 3))
    eye_axis = np.zeros((2, 3))
    eye_radius = np.zeros(2)
    iris_radius = np.zeros(2)
    for k, side in enumerate(("left", "right")):
        sa, sb = _subregion(m, f"sclera_{side}")
        ia, ib = _subregion(m, f"iris_{side}")
        c, r = fit_sphere(m["neutral"][sa:sb].astype(np.float64))
        eye_centre[k], eye_radius[k] = c, r
        for j in range(id_basis.shape[0]):
            cj, _ = fit_sphere((m["neutral"][sa:sb] + m["id_basis"][j, sa:sb]).astype(np.float64))
            eye_centre_id[j, k] = cj - c
        # pupil disc: the vertices PupilDilate moves; the axis runs from the centre through them
        pd = np.linalg.norm(m["extra_exp_basis"][extra.index("PupilDilate" + ("_L" if side == "left" else "_R"))],
                            axis=1)
        pupil = np.nonzero(pd > 1e-3)[0]
        pupil = pupil[(pupil >= ia) & (pupil < ib)]
        axis = m["neutral"][pupil].mean(0) - c
        axis /= np.linalg.norm(axis)
        eye_axis[k] = axis
        iris_v = m["neutral"][ia:ib].astype(np.float64) - c
        h = iris_v @ axis
        front = h.max()
        rad = np.linalg.norm(iris_v - np.outer(h, axis), axis=1)
        iris_radius[k] = rad[h > front - 0.1].max()  # edge of the flat iris disc
        iris_tris = remap[m["faces"][_sub_faces(m, f"iris_{side}")]]
        # The pupil is a hole in the iris mesh, so the pupil centre is on no triangle: express it as
        # the weighted mean of three pupil-rim vertices about 120 degrees apart, one on top (a
        # mirror-symmetric choice), with weights that put the point on the eye axis. The "triangle"
        # of this landmark is therefore not a mesh face.
        disc = np.nonzero(h > front - 0.1)[0]
        rim = disc[rad[disc] < rad[disc].min() + 0.02]
        e1 = np.cross(axis, [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(axis, e1)
        ang = np.arctan2(iris_v[rim] @ e2, iris_v[rim] @ e1)
        pick = [rim[np.argmin(np.abs(np.angle(np.exp(1j * (ang - a0)))))] for a0 in np.radians((-90, 30, 150))]
        T = iris_v[pick]  # relative to the centre c
        # barycentric weights of the axis point in the plane of the three rim vertices
        nrm = np.cross(T[1] - T[0], T[2] - T[0])
        t_ax = (T[0] @ nrm) / (axis @ nrm)
        w3 = np.linalg.solve(T.T, axis * t_ax)  # sums to 1: the point lies in the rim plane
        assert abs(w3.sum() - 1) < 1e-6 and (w3 > 0).all(), w3
        mp_ids = groups[f"{side}_iris"]  # centre first, then the 4 ring points
        ci = mp_ids[0]
        lm_tri[ci], lm_bary[ci] = remap[ia + np.array(pick)], w3
        pc = c + w3 @ T
        ring_t = []
        for j in mp_ids[1:]:
            d = R @ (mp[j] - mp[ci])
            d -= (d @ axis) * axis
            d /= np.linalg.norm(d)
            ring_t.append(pc + iris_radius[k] * d)
        ti, b, _, _ = closest_points_on_mesh(np.array(ring_t), neutral, iris_tris)
        lm_tri[mp_ids[1:]], lm_bary[mp_ids[1:]] = iris_tris[ti], b

    # ---- 4. landmark bases
    def bary_apply(arr):  # arr (..., V, 3) -> (..., 478, 3)
        return np.einsum("pk,...pkd->...pd", lm_bary, arr[..., lm_tri, :])

    lm_neutral = bary_apply(neutral)

    # ---- 5. part labels (frontal projection, landmarks carried onto ICT)
    labels = np.full(V, -1, np.int8)
    P = {n: i for i, n in enumerate(PART_NAMES)}
    face = np.arange(n_face)
    xy = neutral[:, :2]
    lm2 = lm_neutral[:, :2]
    # eyes: front of the eyeball inside the eye-opening contour
    eye_open_face = np.zeros(V, bool)
    for k, side in enumerate(("left", "right")):
        ea, eb = _region(m, f"eyeball_{side}")
        ev = remap[np.arange(ea, eb)]
        poly = lm2[cg[f"{side}_eye"]]
        front = (neutral[ev] - eye_centre[k]) @ eye_axis[k] > 0
        inside = points_in_polygon(xy[ev], poly)
        labels[ev[front & inside]] = P[f"{side}_eye"]
        eye_open_face[face[points_in_polygon(xy[face], poly)]] = True
    # brows
    for side in ("left", "right"):
        poly = lm2[cg[f"{side}_brow_upper"] + cg[f"{side}_brow_lower"][::-1]]
        inside = points_in_polygon(xy[face], poly)
        labels[face[inside & (labels[face] < 0)]] = P[f"{side}_brow"]
    # lips: on a mesh with the mouth slightly open so the two lips separate
    jo = np.zeros(exp_basis.shape[0])
    jo[exp_names.index("jawOpen")] = LIP_LABEL_JAW_OPEN
    open_shape = neutral + np.tensordot(jo, exp_basis, 1)
    lm_open = bary_apply(open_shape)[:, :2]
    xy_open = open_shape[:, :2]
    up = points_in_polygon(xy_open[face], lm_open[upper_poly])
    lo = points_in_polygon(xy_open[face], lm_open[lower_poly])
    mouth_in = points_in_polygon(xy_open[face], lm_open[cg["lips_inner"]])
    labels[face[up & ~jaw_moving[face] & (labels[face] < 0)]] = P["upper_lip"]
    labels[face[lo & (labels[face] < 0)]] = P["lower_lip"]
    # nose: polygon of the nose outline (star-shaped, ordered by angle)
    nose_ids = list(dict.fromkeys(groups["nose_outline"]))
    nose_poly = lm2[nose_ids][star_polygon(lm2[nose_ids])]
    inside = points_in_polygon(xy[face], nose_poly)
    labels[face[inside & (labels[face] < 0)]] = P["nose"]
    # skin: the rest inside the face oval, except the eye openings and the mouth interior
    oval = points_in_polygon(xy[face], lm2[cg["face_oval"]])
    normals = vertex_normals(neutral, face_tris)
    skin = oval & (labels[face] < 0) & ~eye_open_face[face] & ~mouth_in & (normals[face, 2] > 0)
    labels[face[skin]] = P["skin"]

    stats = dict(
        seed_pair_residual_mean=seed_res.mean(), seed_pair_residual_max=seed_res.max(),
        rigid_residual_mean=rigid_stats[0], rigid_residual_max=rigid_stats[1],
        residual_mean=dist.mean(), residual_median=np.median(dist), residual_max=dist.max(),
    )
    out = dict(
        version=np.int32(VERSION),
        vertex_index=vidx, faces=tfaces, n_face=np.int32(n_face),
        lm_tri=lm_tri.astype(np.int32), lm_bary=lm_bary.astype(np.float32),
        lm68_index=lm68.astype(np.int32),
        part_labels=labels, part_names=np.array(PART_NAMES),
        eye_centre=eye_centre.astype(np.float32), eye_centre_id=eye_centre_id.astype(np.float32),
        eye_axis=eye_axis.astype(np.float32), eye_radius=eye_radius.astype(np.float32),
        iris_radius=iris_radius.astype(np.float32),
        align_scale=np.float64(s), align_rotation=R, align_translation=t,
        align_id=id_fit.astype(np.float32), align_exp=exp_fit.astype(np.float32),
        align_mp_on_ict=(s * mp @ R.T + t).astype(np.float32),
        **{f"stat_{k}": np.float64(v) for k, v in stats.items()},
    )
    for k, v in cg.items():
        out[f"contour_{k}"] = np.asarray(v, np.int32)
    out["contour_nose_outline"] = np.asarray(nose_ids, np.int32)[star_polygon(lm2[nose_ids])]
    return out


_BARY_GRID = np.array([(i, j, 4 - i - j) for i in range(5) for j in range(5 - i)], np.float64) / 4.0


def _candidates(q, tris, shape, radius, current):
    """Sample points (triangle corners, barycentric) on ``tris`` near ``q``, plus the current one."""
    cen = shape[tris].mean(1)
    near = tris[np.linalg.norm(cen - q, axis=1) < radius]
    t = np.concatenate([np.repeat(near, len(_BARY_GRID), 0), current[0][None]])
    b = np.concatenate([np.tile(_BARY_GRID, (len(near), 1)), current[1][None]])
    return t, b


def _at(shape, tri, bary):
    return np.einsum("ck,ckd->cd", bary, shape[tri])


def _sub_faces(m, name: str) -> slice:
    names = [str(x) for x in m["subregion_names"]]
    a, b = m["subregion_face_ranges"][names.index(name)]
    return slice(int(a), int(b))


# ------------------------------------------------------------------ cache

_MEMO: dict[str, dict[str, np.ndarray]] = {}


def load_topology(ict_path: Path | None = None, verbose: bool = False,
                  rebuild: bool = False) -> dict[str, np.ndarray]:
    """The derived data (see ``derive``), computed once and cached as npz in the derived cache.

    The cache key is the digest of every input asset plus ``VERSION``.
    """
    ict_path = Path(ict_path) if ict_path else find_asset(ICT_ASSET)
    inputs = [ict_path, find_asset(MP_OBJ_ASSET), find_asset(MP_CONTOURS_ASSET), find_asset(MP_INDICES_ASSET)]
    key = "-".join(file_digest(p, 12) for p in inputs)
    name = f"face_topology_v{VERSION}_{key}.npz"
    if name in _MEMO and not rebuild:
        return _MEMO[name]
    path = derived_cache(name)
    data = None
    if path.is_file() and not rebuild:
        try:
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
        except Exception:  # a truncated or foreign file: recompute
            data = None
    if data is None:
        data = derive(*inputs, verbose=verbose)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # concurrent writers: last one wins
        np.savez_compressed(tmp, **data)
        tmp.replace(path)
    _MEMO[name] = data
    return data


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    d = load_topology(verbose=True, rebuild=True)
    print(f"derived in {time.perf_counter() - t0:.1f} s")
    for i, n in enumerate(PART_NAMES):
        print(f"{n:10s} {(d['part_labels'] == i).sum():6d}")
    print("unlabelled", (d["part_labels"] < 0).sum())
