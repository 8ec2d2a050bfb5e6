"""PRDL geometry core: descriptors, loss, analytic gradient, Gauss-Newton terms (NumPy; CuPy when present)."""
from __future__ import annotations

import numpy as np
import pytest

from engine import prdl



def central_differences(fn, pts, mask, h=1e-6):
    """d fn / d pts by central differences over the valid points: shape fn(pts).shape + pts.shape."""
    out = np.zeros(np.shape(fn(pts)) + pts.shape)
    for p, i in zip(*np.nonzero(mask)):
        for k in range(2):
            xp_, xm = pts.copy(), pts.copy()
            xp_[p, i, k] += h
            xm[p, i, k] -= h
            out[..., p, i, k] = (np.asarray(fn(xp_)) - np.asarray(fn(xm))) / (2 * h)
    return out

def _brute_descriptors(points, anchors, eps=prdl.EPS):
    out = np.zeros((len(anchors), 3))
    if len(points) == 0:
        return out
    for i, a in enumerate(anchors):
        d = [np.sqrt((a[0] - p[0]) ** 2 + (a[1] - p[1]) ** 2 + eps) for p in points]
        out[i] = min(d), max(d), sum(d) / len(d)
    return out


def _problem(seed=0, parts=4, pm=24, n=6, size=60.0):
    rng = np.random.default_rng(seed)
    anchors = prdl.anchor_grid(n, (0, 0, size, size))
    pts = rng.uniform(0, size, (parts, pm, 2))
    mask = rng.random((parts, pm)) < 0.75
    mask[:, 0] = True
    tpts = pts + rng.normal(0, 3, pts.shape)
    tmask = rng.random((parts, pm)) < 0.8
    tmask[:, 0] = True
    tdesc = prdl.part_descriptors(tpts, tmask, anchors)
    w = rng.uniform(0.5, 2.0, parts)
    return anchors, pts, mask, tdesc, w


def test_anchor_grid_covers_box_row_major():
    a = prdl.anchor_grid(4, (0, 0, 8, 4))
    assert a.shape == (16, 2)
    np.testing.assert_allclose(a[:4, 0], [1, 3, 5, 7])
    np.testing.assert_allclose(a[:4, 1], 0.5)
    np.testing.assert_allclose(a[::4, 1], [0.5, 1.5, 2.5, 3.5])
    px = prdl.anchor_grid((5, 3), (-0.5, -0.5, 4.5, 2.5))  # one anchor per pixel centre
    assert px.shape == (15, 2)
    np.testing.assert_allclose(px[7], [2, 1])


def test_descriptors_match_brute_force():
    rng = np.random.default_rng(1)
    anchors = prdl.anchor_grid(5, (0, 0, 40, 40))
    sets = [rng.uniform(0, 40, (k, 2)) for k in (1, 7, 0, 13)]
    for s in sets:
        np.testing.assert_allclose(prdl.descriptors(s, anchors), _brute_descriptors(s, anchors), atol=1e-10)
    pts, mask = prdl.pack_parts(sets, pmax=16)
    pts[~mask] = rng.uniform(-100, 100, (int((~mask).sum()), 2))  # garbage in padding must not matter
    desc, idx = prdl.part_descriptors(pts, mask, anchors, return_index=True)
    for p, s in enumerate(sets):
        np.testing.assert_allclose(desc[p], _brute_descriptors(s, anchors), atol=1e-9)
        if len(s):
            assert mask[p][idx[p]].all()  # argmin / argmax are valid points
            d = np.sqrt(((pts[p][idx[p][:, 0]] - anchors) ** 2).sum(-1) + prdl.EPS)
            np.testing.assert_allclose(d, desc[p][:, 0], atol=1e-9)
    # float32 path agrees to float32 accuracy
    d32 = prdl.part_descriptors(pts.astype(np.float32), mask, anchors.astype(np.float32))
    assert d32.dtype == np.float32
    np.testing.assert_allclose(d32, desc, atol=2e-3)


def test_padding_anywhere_and_ties_go_to_valid_points():
    anchors = prdl.anchor_grid(3, (0, 0, 6, 6))
    pts = np.zeros((1, 5, 2))
    pts[0, 3] = [3, 3]
    mask = np.array([[False, False, False, True, False]])  # only the 4th entry is real
    desc, idx = prdl.part_descriptors(pts, mask, anchors, return_index=True)
    assert (idx == 3).all()
    np.testing.assert_allclose(desc[0], _brute_descriptors(pts[0, 3:4], anchors), atol=1e-10)


def test_fps_picks_spread_points():
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], float)
    pts = np.concatenate([c + rng.normal(0, 2, (200, 2)) for c in centres])
    idx = prdl.farthest_point_sample(pts, 4)
    assert len({tuple(x) for x in (pts[idx] > 50).astype(int)}) == 4  # one pick per cluster
    np.testing.assert_array_equal(idx, prdl.farthest_point_sample(pts, 4))  # deterministic
    k = 40
    sel = pts[prdl.farthest_point_sample(pts, k)]
    rnd = pts[rng.choice(len(pts), k, replace=False)]

    def min_gap(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) + np.eye(len(x)) * 1e9
        return d.min()

    assert min_gap(sel) > 2 * min_gap(rnd)
    assert len(np.unique(prdl.farthest_point_sample(pts, k))) == k
    np.testing.assert_array_equal(prdl.farthest_point_sample(pts[:5], 10), np.arange(5))
    capped = prdl.farthest_point_sample(pts, 8, max_candidates=100)
    assert len(np.unique(capped)) == 8 and capped.max() < len(pts)


def test_loss_zero_when_prediction_equals_target():
    rng = np.random.default_rng(3)
    anchors = prdl.anchor_grid(8, (0, 0, 50, 50))
    sets = [rng.uniform(0, 50, (k, 2)) for k in (5, 9, 30)]
    tpts, tmask = prdl.pack_parts(sets)
    tdesc = prdl.part_descriptors(tpts, tmask, anchors)
    # the prediction holds the same sets, permuted and with different padding
    perm = [s[rng.permutation(len(s))] for s in sets]
    ppts, pmask = prdl.pack_parts(perm, pmax=40)
    loss, grad = prdl.prdl_loss_and_grad(ppts, pmask, tdesc, anchors, [1.0, 2.0, 3.0])
    assert abs(loss) < 1e-18
    assert np.abs(grad).max() < 1e-9


def test_loss_formula_and_gradient_match_finite_differences():
    anchors, pts, mask, tdesc, w = _problem()
    ch = np.array([1.0, 0.5, 2.0])
    loss, grad = prdl.prdl_loss_and_grad(pts, mask, tdesc, anchors, w, channel_weights=ch)
    ref = 0.0
    for p in range(len(pts)):
        d = _brute_descriptors(pts[p][mask[p]], anchors)
        ref += w[p] * (ch * (d - tdesc[p]) ** 2).sum() / len(anchors)
    assert loss == pytest.approx(ref, rel=1e-10)

    fd = central_differences(lambda x: prdl.prdl_loss_and_grad(x, mask, tdesc, anchors, w, channel_weights=ch)[0],
                             pts, mask)
    np.testing.assert_allclose(grad, fd, atol=1e-6 * max(1.0, np.abs(fd).max()))
    assert (grad[~mask] == 0).all()


def test_gradient_structure_min_max_mean():
    """Only the min channel: each anchor moves its argmin point; only the mean: all points move."""
    rng = np.random.default_rng(4)
    anchors = np.array([[0.0, 0.0]])
    pts = rng.uniform(5, 20, (1, 6, 2))
    mask = np.ones((1, 6), bool)
    tdesc = prdl.part_descriptors(pts * 1.1, mask, anchors)
    _, g_min = prdl.prdl_loss_and_grad(pts, mask, tdesc, anchors, channel_weights=(1, 0, 0))
    _, g_mean = prdl.prdl_loss_and_grad(pts, mask, tdesc, anchors, channel_weights=(0, 0, 1))
    nz = np.nonzero(np.abs(g_min).sum(-1)[0])[0]
    d = np.sqrt((pts[0] ** 2).sum(-1))
    assert list(nz) == [int(d.argmin())]
    assert (np.abs(g_mean).sum(-1) > 0).all()
    # the min gradient lies along the anchor-to-point line
    v = pts[0, nz[0]]
    g = g_min[0, nz[0]]
    assert abs(g[0] * v[1] - g[1] * v[0]) < 1e-9 * np.linalg.norm(g) * np.linalg.norm(v)


def test_empty_parts_are_excluded():
    anchors, pts, mask, tdesc, w = _problem(seed=5)
    full, _ = prdl.prdl_loss_and_grad(pts, mask, tdesc, anchors, w)
    contrib = [prdl.prdl_loss_and_grad(pts[p:p + 1], mask[p:p + 1], tdesc[p:p + 1], anchors, w[p:p + 1])[0]
               for p in range(len(pts))]
    assert full == pytest.approx(sum(contrib), rel=1e-12)
    # empty prediction for part 1, empty target for part 2
    m2 = mask.copy()
    m2[1] = False
    t2 = tdesc.copy()
    t2[2] = 0.0
    loss, grad = prdl.prdl_loss_and_grad(pts, m2, t2, anchors, w)
    assert loss == pytest.approx(contrib[0] + contrib[3], rel=1e-12)
    assert (grad[1] == 0).all() and (grad[2] == 0).all()
    assert np.isfinite(grad).all()
    # explicit target_valid says the same as the inferred one
    loss2, _ = prdl.prdl_loss_and_grad(pts, m2, t2, anchors, w, target_valid=[True, True, False, True])
    assert loss2 == pytest.approx(loss, rel=1e-12)
    terms = prdl.gauss_newton_terms(pts, m2, t2, anchors, w)
    assert list(terms.used) == [True, False, False, True]
    assert terms.loss == pytest.approx(loss, rel=1e-12)


def test_gauss_newton_terms_and_normal_equations():
    anchors, pts, mask, tdesc, w = _problem(seed=6, parts=3, pm=12, n=5)
    ch = (1.0, 0.7, 1.3)
    terms = prdl.gauss_newton_terms(pts, mask, tdesc, anchors, w, channel_weights=ch)
    loss, grad = prdl.prdl_loss_and_grad(pts, mask, tdesc, anchors, w, channel_weights=ch)
    assert terms.loss == pytest.approx(loss, rel=1e-12)
    assert float(terms.residuals @ terms.residuals) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(terms.grad, grad, atol=1e-10)

    # compact point Jacobian == finite differences of the residuals
    J = prdl.dense_point_jacobian(terms)
    fd = central_differences(
        lambda x: prdl.gauss_newton_terms(x, mask, tdesc, anchors, w, channel_weights=ch).residuals, pts, mask
    ).reshape(J.shape)
    np.testing.assert_allclose(J, fd, atol=1e-6)

    # chained normal equations == dense J^T J, J^T r
    rng = np.random.default_rng(7)
    n = 7
    pj = rng.normal(size=pts.shape + (n,))
    jtj, jtr = prdl.normal_equations(pj, terms)
    Jt = J @ (pj * mask[..., None, None]).reshape(-1, n)
    np.testing.assert_allclose(jtj, Jt.T @ Jt, atol=1e-10 * np.abs(jtj).max())
    np.testing.assert_allclose(jtr, Jt.T @ terms.residuals, atol=1e-10 * np.abs(jtr).max())
    # anchor-strided mean block: approximate J^T J, exact J^T r
    jtj2, jtr2 = prdl.normal_equations(pj, terms, mean_anchor_stride=2)
    np.testing.assert_allclose(jtr2, jtr, atol=1e-12)
    assert np.linalg.norm(jtj2 - jtj) < 0.5 * np.linalg.norm(jtj)


def test_gauss_newton_recovers_a_shift():
    """A building-block check: two parameters (image shift) recovered by damped GN steps."""
    rng = np.random.default_rng(8)
    anchors = prdl.anchor_grid(16, (0, 0, 64, 64))
    sets = [rng.uniform(10, 30, (20, 2)), rng.uniform(35, 55, (40, 2))]
    base, mask = prdl.pack_parts(sets)
    shift_true = np.array([2.5, -1.5])
    tdesc = prdl.part_descriptors(base + shift_true, mask, anchors)
    pj = np.zeros(base.shape + (2,))
    pj[..., 0, 0] = 1.0
    pj[..., 1, 1] = 1.0
    shift = np.zeros(2)
    losses = []
    for _ in range(8):
        terms = prdl.gauss_newton_terms(base + shift, mask, tdesc, anchors)
        losses.append(terms.loss)
        jtj, jtr = prdl.normal_equations(pj, terms)
        shift -= np.linalg.solve(jtj + 1e-6 * np.eye(2), jtr)
    assert losses[-1] < 1e-6 * losses[0]
    np.testing.assert_allclose(shift, shift_true, atol=1e-3)


def test_label_point_sets_and_target():
    lab = np.full((10, 12), -1, np.int8)
    lab[2:4, 3:6] = 0
    lab[6, 8] = 2
    sets = prdl.label_point_sets(lab, 3)
    assert [len(s) for s in sets] == [6, 0, 1]
    np.testing.assert_array_equal(sets[2], [[8, 6]])  # (x = col, y = row)
    anchors = prdl.anchor_grid(4, (-0.5, -0.5, 11.5, 9.5))
    desc, valid = prdl.target_from_labels(lab, anchors, 3)
    assert list(valid) == [True, False, True]
    np.testing.assert_allclose(desc[0], _brute_descriptors(sets[0], anchors), atol=1e-9)
    assert (desc[1] == 0).all()
    few = prdl.label_point_sets(lab, 3, max_points=2)
    assert [len(s) for s in few] == [2, 0, 1]


def test_part_index_gathers_parts():
    labels = np.array([0, 1, -1, 0, 2, 0, 1])
    idx, valid = prdl.part_index(labels, 3)
    assert idx.shape == (3, 3)
    np.testing.assert_array_equal(idx[0], [0, 3, 5])
    np.testing.assert_array_equal(valid.sum(1), [3, 2, 1])
    layout = np.arange(14, dtype=float).reshape(7, 2)
    idx2, valid2 = prdl.part_index(labels, 3, max_points=2, layout=layout)
    assert valid2.sum(1).tolist() == [2, 2, 1]
    assert set(idx2[0]) <= {0, 3, 5}


@pytest.mark.skipif(not prdl.cupy_available(), reason="CuPy is not installed")
def test_cupy_kernels_match_numpy():  # pragma: no cover - needs a GPU
    import cupy as cp

    for dt in (np.float64, np.float32):
        anchors, pts, mask, tdesc, w = _problem(seed=9, parts=8, pm=300, n=20, size=224.0)
        anchors, pts, tdesc = anchors.astype(dt), pts.astype(dt), tdesc.astype(dt)
        c = dict(anchors=cp.asarray(anchors), pts=cp.asarray(pts), mask=cp.asarray(mask), tdesc=cp.asarray(tdesc),
                 w=cp.asarray(w))
        f64 = dt == np.float64
        d_np = prdl.part_descriptors(pts, mask, anchors)
        d_cp = prdl.part_descriptors(c["pts"], c["mask"], c["anchors"])
        assert d_cp.dtype == dt
        np.testing.assert_allclose(d_cp.get(), d_np, atol=1e-9 if f64 else 2e-2)
        l_np, g_np = prdl.prdl_loss_and_grad(pts, mask, tdesc, anchors, w)
        l_cp, g_cp = prdl.prdl_loss_and_grad(c["pts"], c["mask"], c["tdesc"], c["anchors"], c["w"])
        assert float(l_cp) == pytest.approx(l_np, rel=1e-9 if f64 else 1e-3)
        close = np.isclose(g_cp.get(), g_np, atol=1e-3 * np.abs(g_np).max(), rtol=1e-6 if f64 else 1e-2)
        assert close.all() if f64 else close.mean() > 0.98  # float32: near-ties may pick another point
        if f64:
            t_np = prdl.gauss_newton_terms(pts, mask, tdesc, anchors, w)
            t_cp = prdl.gauss_newton_terms(c["pts"], c["mask"], c["tdesc"], c["anchors"], c["w"])
            np.testing.assert_allclose(t_cp.residuals.get(), t_np.residuals, atol=1e-9)
            np.testing.assert_allclose(t_cp.grad.get(), t_np.grad, atol=1e-9 * np.abs(t_np.grad).max())
            pj = np.random.default_rng(0).normal(size=pts.shape + (5,))
            for x, y in zip(prdl.normal_equations(cp.asarray(pj), t_cp), prdl.normal_equations(pj, t_np)):
                np.testing.assert_allclose(x.get(), y, rtol=1e-7, atol=1e-9 * np.abs(y).max())
    x = np.random.default_rng(1).uniform(0, 200, (5000, 2))
    for dt in (np.float64, np.float32):
        np.testing.assert_array_equal(prdl.farthest_point_sample(cp.asarray(x.astype(dt)), 64).get(),
                                      prdl.farthest_point_sample(x.astype(dt), 64))
    lab = np.full((40, 50), -1, np.int8)
    lab[5:20, 10:30] = 3
    for a, b in zip(prdl.label_point_sets(cp.asarray(lab), 8, max_points=30), prdl.label_point_sets(lab, 8, max_points=30)):
        np.testing.assert_array_equal(a.get(), b)


def test_per_part_anchors_match_shared_anchors_and_finite_differences():
    """Anchors may differ per part: the same grid given per part gives identical results, and the
    gradient of a per-part setup matches finite differences."""
    rng = np.random.default_rng(4)
    pts = rng.uniform(0, 50, (3, 12, 2))
    mask = rng.random((3, 12)) > 0.2
    shared = prdl.anchor_grid(5, (0, 0, 50, 50))
    target = prdl.part_descriptors(pts + rng.normal(0, 2, pts.shape), mask, shared)
    l1, g1 = prdl.prdl_loss_and_grad(pts, mask, target, shared)
    l2, g2 = prdl.prdl_loss_and_grad(pts, mask, target, np.broadcast_to(shared, (3,) + shared.shape).copy())
    assert np.isclose(l1, l2) and np.allclose(g1, g2)
    per = np.stack([prdl.anchor_grid(4, (10 * k, 5, 10 * k + 30, 45)) for k in range(3)])
    tdesc = prdl.part_descriptors(pts + 1.0, mask, per)
    loss, grad = prdl.prdl_loss_and_grad(pts, mask, tdesc, per)
    h = 1e-6
    num = np.zeros_like(pts)
    for idx in zip(*np.nonzero(mask)):
        for k in range(2):
            p2 = pts.copy()
            p2[idx + (k,)] += h
            num[idx + (k,)] = (prdl.prdl_loss_and_grad(p2, mask, tdesc, per)[0] - loss) / h
    assert np.allclose(grad, num, atol=1e-3)
    terms = prdl.gauss_newton_terms(pts, mask, tdesc, per)
    assert np.isclose(terms.loss, loss)
    jac = np.broadcast_to(np.eye(2)[None, None], (3, 12, 2, 2)).reshape(3, 12, 2, 2)
    jtj, jtr = prdl.normal_equations(np.repeat(jac[..., :1], 1, -1), terms)
    assert np.isfinite(jtj).all() and np.isfinite(jtr).all()


@pytest.mark.skipif(not prdl.cupy_available(), reason="CuPy is not installed")
def test_cupy_per_part_anchors_match_numpy():  # pragma: no cover - needs a GPU
    """Per-part anchor grids (the refinement's default) take the array-module path on CuPy."""
    import cupy as cp

    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 80, (8, 64, 2))
    mask = rng.random((8, 64)) > 0.1
    per = np.stack([prdl.anchor_grid(8, (5 * k, 0, 5 * k + 40, 60)) for k in range(8)])
    tdesc = prdl.part_descriptors(pts + rng.normal(0, 1.5, pts.shape), mask, per)
    t_np = prdl.gauss_newton_terms(pts, mask, tdesc, per)
    t_cp = prdl.gauss_newton_terms(cp.asarray(pts), cp.asarray(mask), cp.asarray(tdesc), cp.asarray(per))
    np.testing.assert_allclose(t_cp.residuals.get(), t_np.residuals, atol=1e-9)
    np.testing.assert_allclose(t_cp.grad.get(), t_np.grad, atol=1e-9 * np.abs(t_np.grad).max())
    pj = rng.normal(size=pts.shape + (7,))
    for x, y in zip(prdl.normal_equations(cp.asarray(pj), t_cp), prdl.normal_equations(pj, t_np)):
        np.testing.assert_allclose(x.get(), y, rtol=1e-7, atol=1e-9 * np.abs(y).max())
