"""ICT face model, derived topology (landmarks, part labels) and the ARKit mapping.

Needs the assets (FACESTREAM_ASSETS). The first run derives and caches the topology (~20 s).
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.arkit import (ARKIT_NAMES, ICT_EXP_NAMES, ICT_TO_ARKIT, MAPPING_NOTES, arkit_to_ict, ict_to_arkit,
                          ict_to_arkit_dict)
from engine.assets import AssetMissingError, find_asset


@pytest.fixture(scope="module")
def fm():
    try:
        find_asset("ict_facekit/ict_face_model.npz")
        find_asset("mediapipe/face_model_with_iris.obj")
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    from engine.face_model import FaceModel

    return FaceModel.load()


@pytest.fixture(scope="module")
def npz():
    with np.load(find_asset("ict_facekit/ict_face_model.npz")) as z:
        return {k: z[k] for k in ("neutral", "id_basis", "exp_basis", "landmarks_multipie68", "faces")}


def exp_vec(fm, **weights):
    e = np.zeros(fm.n_exp, np.float32)
    for k, v in weights.items():
        e[fm.exp_names.index(k)] = v
    return e


def gap(lm, a, b):
    return float(np.linalg.norm(lm[..., a, :] - lm[..., b, :], axis=-1))


# ------------------------------------------------------------------ model

def test_counts(fm, npz):
    assert fm.n_id == 100 and fm.n_exp == 53
    assert fm.exp_names == ICT_EXP_NAMES
    # face region (0..9408) + eyeball_left (21451..23020) + eyeball_right (23021..24590)
    expected = np.r_[np.arange(0, 9409), np.arange(21451, 24591)]
    np.testing.assert_array_equal(fm.vertex_index, expected)
    assert fm.n_vertices == 12549 and fm.n_face_vertices == 9409
    assert fm.faces.shape == (18460 + 2 * 3132, 3)
    assert fm.faces.min() == 0 and fm.faces.max() == fm.n_vertices - 1
    assert fm.full_faces.shape == (52220, 3)
    # re-indexing keeps the triangles: map back and compare with the npz triangles
    back = fm.vertex_index[fm.faces]
    np.testing.assert_array_equal(back[:18460], npz["faces"][:18460])
    np.testing.assert_array_equal(back[18460:], npz["faces"][42572:48836])
    assert fm.eyeball_slices["left"] == slice(9409, 10979)
    assert fm.eyeball_slices["right"] == slice(10979, 12549)


def test_zero_coefficients_give_neutral(fm, npz):
    v = fm.vertices(np.zeros(100), np.zeros(53))
    assert v.shape == (fm.n_vertices, 3) and v.dtype == np.float32
    np.testing.assert_allclose(v, npz["neutral"][fm.vertex_index], atol=1e-6)
    np.testing.assert_allclose(fm.vertices(), v, atol=0)
    np.testing.assert_allclose(fm.full_vertices(), npz["neutral"], atol=1e-6)


@pytest.mark.parametrize("kind,k", [("id", 0), ("id", 57), ("exp", 26), ("exp", 10)])
def test_single_coefficient(fm, npz, kind, k):
    idc, ex = np.zeros(100, np.float32), np.zeros(53, np.float32)
    (idc if kind == "id" else ex)[k] = 1.0
    basis = npz["id_basis"] if kind == "id" else npz["exp_basis"]
    want = npz["neutral"] + basis[k]
    np.testing.assert_allclose(fm.vertices(idc, ex), want[fm.vertex_index], atol=2e-5)
    np.testing.assert_allclose(fm.full_vertices(idc, ex), want, atol=2e-5)


def test_batched_and_broadcast(fm):
    rng = np.random.default_rng(1)
    idc = rng.normal(size=(2, 3, 100)).astype(np.float32)
    ex = rng.uniform(size=(2, 3, 53)).astype(np.float32)
    v = fm.vertices(idc, ex)
    assert v.shape == (2, 3, fm.n_vertices, 3)
    np.testing.assert_allclose(v[1, 2], fm.vertices(idc[1, 2], ex[1, 2]), atol=1e-4)
    # one identity, several expressions
    v2 = fm.vertices(idc[0, 0], ex[0])
    assert v2.shape == (3, fm.n_vertices, 3)
    np.testing.assert_allclose(v2[2], fm.vertices(idc[0, 0], ex[0, 2]), atol=1e-4)
    with pytest.raises(ValueError):
        fm.vertices(np.zeros(99), np.zeros(53))


def test_with_identity_matches(fm):
    rng = np.random.default_rng(2)
    idc = rng.normal(size=100).astype(np.float32)
    ex = rng.uniform(size=(4, 53)).astype(np.float32)
    face = fm.with_identity(idc)
    np.testing.assert_allclose(face.vertices(ex), fm.vertices(idc, ex), atol=1e-4)
    np.testing.assert_allclose(face.landmarks(ex), fm.landmarks(idc, ex), atol=1e-4)
    np.testing.assert_allclose(face.landmarks68(ex), fm.landmarks68(idc, ex), atol=1e-4)


def test_landmarks_consistent_with_vertices(fm):
    rng = np.random.default_rng(3)
    idc = rng.normal(size=100).astype(np.float32)
    ex = rng.uniform(0, 0.5, size=53).astype(np.float32)
    v = fm.vertices(idc, ex)
    lm = fm.surface_landmarks(idc, ex)
    assert lm.shape == (478, 3) and fm.lm_neutral.shape == (478, 3)
    assert fm.lm_id.shape == (100, 478, 3) and fm.lm_exp.shape == (53, 478, 3)
    np.testing.assert_allclose(lm, fm.landmarks_from_vertices(v), atol=1e-4)
    np.testing.assert_allclose(fm.landmarks68(idc, ex), v[fm.lm68_index], atol=1e-4)
    assert fm.landmarks68().shape == (68, 3)
    np.testing.assert_allclose(np.abs(fm.lm_bary.sum(1)), 1.0, atol=1e-5)
    assert (fm.lm_bary >= -1e-6).all()


def test_lm68_index_from_npz(fm, npz):
    # face-region vertices keep their index in the tracking mesh
    np.testing.assert_array_equal(fm.vertex_index[fm.lm68_index], npz["landmarks_multipie68"])


# ------------------------------------------------------------------ landmarks: semantics

@pytest.mark.parametrize("mp,i68,tol", [(1, 30, 1.0), (4, 30, 0.3), (152, 8, 1.0), (33, 36, 1.0), (133, 39, 1.0),
                                        (362, 42, 1.0), (263, 45, 1.0), (61, 48, 1.0), (291, 54, 1.0)])
def test_landmarks_semantic(fm, mp, i68, tol):
    d = np.linalg.norm(fm.lm_neutral[mp] - fm.lm68_neutral[i68])
    assert d < tol, f"MediaPipe {mp} is {d:.2f} cm from 68-pt {i68}"


def test_left_right_convention(fm):
    lm = fm.lm_neutral
    for i in (263, 362, 386, 374, 473, 291):  # subject's left
        assert lm[i, 0] > 0.5
    for i in (33, 133, 159, 145, 468, 61):  # subject's right
        assert lm[i, 0] < -0.5


def test_iris_on_eyeballs(fm):
    for side, ids in (("left", range(473, 478)), ("right", range(468, 473))):
        sl = fm.eyeball_slices[side]
        ids = list(ids)
        assert ((fm.lm_tri[ids] >= sl.start) & (fm.lm_tri[ids] < sl.stop)).all()
        ring = np.linalg.norm(fm.lm_neutral[ids[1:]] - fm.lm_neutral[ids[0]], axis=1)
        assert (ring > 0.4).all() and (ring < 0.8).all()
    # ring order follows MediaPipe: 469/474 at +x, 470/475 up, 471/476 at -x, 472/477 down
    lm = fm.lm_neutral
    for c, px, up, mx, dn in ((468, 469, 470, 471, 472), (473, 474, 475, 476, 477)):
        assert lm[px, 0] > lm[c, 0] > lm[mx, 0] and lm[up, 1] > lm[c, 1] > lm[dn, 1]
    # the other 468 landmarks are on the face region
    assert (fm.lm_tri[:468] < fm.n_face_vertices).all()


def test_blink_closes_the_right_lids(fm):
    open_ = fm.surface_landmarks()
    blink_l = fm.surface_landmarks(None, exp_vec(fm, eyeBlink_L=1.0))
    blink_r = fm.surface_landmarks(None, exp_vec(fm, eyeBlink_R=1.0))
    for up, lo in ((386, 374), (385, 380), (387, 373)):  # subject's left eye
        assert gap(open_, up, lo) > 0.6
        assert gap(blink_l, up, lo) < 0.15
        assert gap(blink_r, up, lo) == pytest.approx(gap(open_, up, lo), abs=1e-3)
    for up, lo in ((159, 145), (158, 153), (160, 144)):  # subject's right eye
        assert gap(open_, up, lo) > 0.6
        assert gap(blink_r, up, lo) < 0.15
        assert gap(blink_l, up, lo) == pytest.approx(gap(open_, up, lo), abs=1e-3)


def test_jaw_opens_the_inner_lips(fm):
    rest = fm.surface_landmarks()
    open_ = fm.surface_landmarks(None, exp_vec(fm, jawOpen=1.0))
    for up, lo in ((13, 14), (82, 87), (312, 317)):
        assert gap(rest, up, lo) < 0.2  # ICT's neutral mouth is closed
        assert gap(open_, up, lo) > 2.5
        assert open_[up, 1] > open_[lo, 1]


def test_alignment_residuals(fm):
    a = fm.alignment
    assert float(a["stat_residual_mean"]) < 0.15
    assert float(a["stat_residual_max"]) < 0.5
    assert 0.8 < float(a["align_scale"]) < 1.2


# ------------------------------------------------------------------ part labels

def test_part_labels(fm):
    from engine.face_model import PART_NAMES

    assert PART_NAMES == ("left_eye", "right_eye", "left_brow", "right_brow", "upper_lip", "lower_lip", "nose",
                          "skin")
    lab = fm.part_labels
    assert lab.shape == (fm.n_vertices,) and lab.dtype == np.int8
    assert lab.min() >= -1 and lab.max() < len(PART_NAMES)
    v = fm.neutral
    counts = {p: int((lab == k).sum()) for k, p in enumerate(PART_NAMES)}
    assert all(c > 20 for c in counts.values()), counts
    assert counts["skin"] == max(counts.values())
    for side, sign in (("left", 1), ("right", -1)):
        for part in (f"{side}_eye", f"{side}_brow"):
            assert (sign * v[fm.part_vertices(part), 0] > 0).all(), part
        # eyes: only eyeball vertices of the same side, on its front
        eye = fm.part_vertices(f"{side}_eye")
        sl = fm.eyeball_slices[side]
        assert ((eye >= sl.start) & (eye < sl.stop)).all()
        k = 0 if side == "left" else 1
        assert (((v[eye] - fm.eye_centres[k]) @ fm.eye_axes[k]) > 0).all()
        brow = v[fm.part_vertices(f"{side}_brow")]
        assert brow[:, 1].min() > fm.lm_neutral[386 if side == "left" else 159, 1]  # above the upper lid
    # all non-eye parts are on the face region
    assert (np.nonzero((lab >= 2))[0] < fm.n_face_vertices).all()
    # lips near the mouth; upper above lower
    mouth = 0.5 * (fm.lm_neutral[13] + fm.lm_neutral[14])
    up, lo = v[fm.part_vertices("upper_lip")], v[fm.part_vertices("lower_lip")]
    for lip in (up, lo):
        assert np.linalg.norm(lip[:, :2] - mouth[:2], axis=1).max() < 3.5
    assert up[:, 1].mean() > mouth[1] > lo[:, 1].mean()
    # the nose tip (68-pt 30) is nose; the 68-pt 8 chin is skin
    assert lab[fm.lm68_index[30]] == PART_NAMES.index("nose")
    assert lab[fm.lm68_index[8]] == PART_NAMES.index("skin")


# ------------------------------------------------------------------ eyes

def test_eyeball_rotate(fm):
    v, lm = fm.vertices(), fm.surface_landmarks()
    v0, lm0 = fm.eyeball_rotate(v, 0.0, 0.0, landmarks=lm)
    np.testing.assert_allclose(v0, v, atol=1e-5)
    v1, lm1 = fm.eyeball_rotate(v, 0.3, 0.0, landmarks=lm)  # gaze toward the subject's left (+x)
    assert lm1[473, 0] > lm[473, 0] + 0.2 and lm1[468, 0] > lm[468, 0] + 0.2
    _, lm2 = fm.eyeball_rotate(v, 0.0, 0.3, landmarks=lm)  # look up
    assert lm2[473, 1] > lm[473, 1] + 0.2
    # rigid about the centres; nothing else moves
    np.testing.assert_array_equal(v1[: fm.n_face_vertices], v[: fm.n_face_vertices])
    sl = fm.eyeball_slices["left"]
    r0 = np.linalg.norm(v[sl] - fm.eye_centres[0], axis=1)
    np.testing.assert_allclose(np.linalg.norm(v1[sl] - fm.eye_centres[0], axis=1), r0, atol=1e-4)
    np.testing.assert_allclose(fm.landmarks_from_vertices(v1)[468:], lm1[468:], atol=1e-4)
    # per-eye angles, batched
    vb = fm.eyeball_rotate(np.stack([v, v]), np.array([[0.2, -0.2], [0.0, 0.0]]), 0.0)
    assert vb.shape == (2,) + v.shape
    np.testing.assert_allclose(vb[1], v, atol=1e-5)


# ------------------------------------------------------------------ ARKit

def test_arkit_names():
    assert len(ARKIT_NAMES) == 52 and len(set(ARKIT_NAMES)) == 52
    assert ARKIT_NAMES[0] == "eyeBlinkLeft" and ARKIT_NAMES[17] == "jawOpen"
    assert ARKIT_NAMES[43] == "browInnerUp" and ARKIT_NAMES[51] == "tongueOut"
    assert ICT_TO_ARKIT.shape == (53, 52)
    assert "tongueOut" in MAPPING_NOTES and "browInnerUp" in MAPPING_NOTES


def test_arkit_mapping():
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(100, 53)).astype(np.float32)
    y = ict_to_arkit(x)
    assert y.shape == (100, 52)
    assert (y >= 0).all() and (y <= 1).all()
    assert (y[:, ARKIT_NAMES.index("tongueOut")] == 0).all()
    assert (ict_to_arkit(np.ones(53)) == np.r_[np.ones(51), 0]).all()
    i = ICT_EXP_NAMES.index
    a = ARKIT_NAMES.index
    np.testing.assert_allclose(y[:, a("browInnerUp")], (x[:, i("browInnerUp_L")] + x[:, i("browInnerUp_R")]) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(y[:, a("cheekPuff")], (x[:, i("cheekPuff_L")] + x[:, i("cheekPuff_R")]) / 2, rtol=1e-6)
    assert (y[:, a("eyeBlinkLeft")] == x[:, i("eyeBlink_L")]).all()
    assert (y[:, a("mouthSmileRight")] == x[:, i("mouthSmile_R")]).all()
    assert (y[:, a("jawOpen")] == x[:, i("jawOpen")]).all()
    # every ARKit shape but tongueOut has a source, every ICT shape a target
    assert ((ICT_TO_ARKIT > 0).sum(0) == np.r_[np.ones(43), 2, np.ones(2), 2, np.ones(4), 0]).all()
    assert ((ICT_TO_ARKIT > 0).sum(1) == 1).all()
    d = ict_to_arkit_dict(x[0])
    assert list(d) == list(ARKIT_NAMES)
    # inverse on symmetric inputs
    sym = np.zeros(53, np.float32)
    sym[[i("browInnerUp_L"), i("browInnerUp_R")]] = 0.4
    sym[i("eyeBlink_R")] = 0.7
    np.testing.assert_allclose(arkit_to_ict(ict_to_arkit(sym)), sym, atol=1e-7)


# ------------------------------------------------------------------ cache and drawing

def test_topology_is_cached(fm):
    from engine.face_topology import load_topology

    t1 = load_topology()
    t2 = load_topology()
    assert t1 is t2
    np.testing.assert_array_equal(t1["part_labels"], fm.part_labels)


def test_draw_tool(fm, tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "draw_face_model", Path(__file__).resolve().parents[1] / "tools" / "draw_face_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "parts.png"
    mod.main(["--out", str(out), "--dpi", "40"])
    assert out.stat().st_size > 10_000
