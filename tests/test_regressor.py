"""The regressor recovers known coefficients from landmarks projected from the face model itself."""
from __future__ import annotations

import numpy as np
import pytest

from engine.geometry import FLIP, Camera, euler_to_matrix, matrix_to_euler, matrix_to_quat, rotation_from_6d


@pytest.fixture(scope="module")
def regressor(model):
    from engine.regressor import Regressor

    return Regressor(model)


def synth(model, exp_pairs, yaw=15.0, pitch=-5.0, roll=8.0, identity=None, dist=55.0):
    exp = np.zeros(model.n_exp)
    for name, v in exp_pairs.items():
        exp[model.exp_names.index(name)] = v
    ident = np.zeros(model.n_id) if identity is None else identity
    cam = Camera.from_fov(640, 480, 60.0)
    rc = FLIP @ euler_to_matrix(yaw, pitch, roll)
    pts = model.landmarks(ident, exp) @ rc.T + np.array([2.0, -1.0, dist])
    return cam.project(pts), exp, rc, cam


def test_euler_roundtrip_and_quaternion():
    r = euler_to_matrix(30.0, -12.0, 7.0)
    assert np.allclose(matrix_to_euler(r), (30.0, -12.0, 7.0), atol=1e-9)
    q = matrix_to_quat(r)
    assert abs(np.linalg.norm(q) - 1) < 1e-9 and q[3] >= 0
    assert np.allclose(rotation_from_6d(np.concatenate([r[:, 0], r[:, 1]])), r, atol=1e-9)


def test_yaw_sign_convention():
    """yaw > 0 turns the nose toward the subject's left (+x, image right for an unmirrored camera)."""
    nose = euler_to_matrix(20.0, 0.0, 0.0) @ np.array([0.0, 0.0, 10.0])
    assert nose[0] > 0
    up = euler_to_matrix(0.0, 20.0, 0.0) @ np.array([0.0, 0.0, 10.0])
    assert up[1] > 0


@pytest.mark.parametrize("case", [
    {"eyeBlink_L": 1.0, "eyeBlink_R": 1.0},
    {"eyeBlink_L": 0.9},
    {"jawOpen": 0.6, "mouthFunnel": 0.3},
    {"mouthSmile_L": 0.8, "mouthSmile_R": 0.2},
    {"browInnerUp_L": 0.7, "browInnerUp_R": 0.7, "eyeWide_L": 0.5, "eyeWide_R": 0.5},
])
def test_fit_recovers_expression_and_pose(model, regressor, case):
    obs, exp, rc, cam = synth(model, case)
    landmarks = np.concatenate([obs, np.zeros((len(obs), 1))], axis=1)
    reg = regressor.regress(landmarks, cam, np.zeros(model.n_id))
    fit = reg.fit
    for name, v in case.items():
        got = fit.expression[model.exp_names.index(name)]
        assert abs(got - v) < 0.15, f"{name}: fitted {got:.2f}, true {v:.2f}"
    fixed = regressor.fitter.fixed_exp
    mae = np.abs(fit.expression - exp)[~fixed].mean()
    assert mae < 0.03, f"expression MAE {mae:.3f}"
    ang = np.degrees(np.arccos(np.clip((np.trace(fit.rotation_cam.T @ rc) - 1) / 2, -1, 1)))
    assert ang < 1.5, f"rotation error {ang:.2f} deg"
    assert fit.rms_px < 1.0


def test_learned_head_gives_a_usable_start(model, regressor):
    obs, exp, rc, cam = synth(model, {"jawOpen": 0.5, "eyeBlink_L": 1.0, "eyeBlink_R": 1.0}, yaw=-30.0)
    lm = np.concatenate([obs, np.zeros((len(obs), 1))], axis=1)
    r = regressor.head_rotation(lm)
    ang = np.degrees(np.arccos(np.clip((np.trace(r.T @ rc) - 1) / 2, -1, 1)))
    assert ang < 10.0
    t = np.array([2.0, -1.0, 55.0])
    e = regressor.head_expression(lm, cam, rc, t, np.zeros(model.n_id))
    assert e[model.exp_names.index("jawOpen")] > 0.3
    assert e[model.exp_names.index("eyeBlink_L")] > 0.6
    assert np.abs(e - exp)[~regressor.fitter.fixed_exp].mean() < 0.05


def test_identity_is_recovered_over_frames(model, regressor):
    rng = np.random.default_rng(0)
    ident = np.zeros(model.n_id)
    ident[:10] = rng.normal(0, 1.0, 10)
    est = np.zeros(model.n_id)
    prev = None
    for k in range(8):
        obs, exp, rc, cam = synth(model, {"jawOpen": 0.1 * k}, yaw=-20 + 5 * k, identity=ident)
        lm = np.concatenate([obs, np.zeros((len(obs), 1))], axis=1)
        reg = regressor.regress(lm, cam, est, prev, fit_identity=True)
        est = reg.fit.identity
        prev = reg.fit
    # shape error of the landmarks (cm) is far below that of the mean face
    truth = model.landmarks(ident, np.zeros(model.n_exp))
    err_est = np.linalg.norm(model.landmarks(est, np.zeros(model.n_exp)) - truth, axis=1).mean()
    err_zero = np.linalg.norm(model.landmarks(np.zeros(model.n_id), np.zeros(model.n_exp)) - truth, axis=1).mean()
    assert err_est < 0.6 * err_zero, f"identity landmark error {err_est:.3f} cm vs {err_zero:.3f} cm for the mean"


@pytest.mark.parametrize("yaw_deg,pitch_deg", [(15.0, 0.0), (-12.0, 8.0)])
def test_gaze_follows_the_iris(model, regressor, yaw_deg, pitch_deg):
    """Turn the model's eyeballs, project, and read the gaze back under a turned head."""
    exp = np.zeros(model.n_exp)
    lm = model.landmarks(np.zeros(model.n_id), exp)
    verts, lm_rot = model.eyeball_rotate(model.vertices(), np.radians(yaw_deg), np.radians(pitch_deg),
                                         landmarks=lm[None])
    cam = Camera.from_fov(640, 480, 60.0)
    rc = FLIP @ euler_to_matrix(20.0, 5.0, -5.0)
    t = np.array([1.0, 0.0, 60.0])
    obs = cam.project(lm_rot[0] @ rc.T + t)
    gaze = regressor.gaze(obs, cam, rc, t, np.zeros(model.n_id), exp)
    for side in ("left", "right"):
        rest_yaw, rest_pitch = regressor.gaze.rest_deg[side]  # ICT's eyes rest slightly outward
        assert abs(gaze[side][0] - rest_yaw - yaw_deg) < 1.0, gaze
        assert abs(gaze[side][1] - rest_pitch - pitch_deg) < 1.0, gaze


def _tracked_faces(model, regressor, n=6):
    """Tracked faces: each face's previous fit, then its next frame's landmarks (moved a little)."""
    rng = np.random.default_rng(4)
    shapes = ["jawOpen", "eyeBlink_L", "mouthSmile_R", "browInnerUp_L", "mouthPucker", "eyeWide_R"]
    items = []
    for i in range(n):
        lm, _, _, cam = synth(model, {shapes[i % len(shapes)]: 0.7, "jawOpen": 0.2}, yaw=-20.0 + 8 * i, pitch=3.0)
        identity = np.zeros(model.n_id)
        previous = regressor.regress(lm, cam, identity).fit
        nxt = lm + rng.normal(0.0, 0.4, lm.shape)
        items.append((nxt, cam, identity, previous))
    return items


def test_regress_batch_matches_face_by_face(model, regressor):
    """The batched tracking regression (one MLP call, one batched torch Gauss-Newton) gives each face the
    per-face NumPy answer."""
    items = _tracked_faces(model, regressor)
    batch = regressor.regress_batch(*[list(x) for x in zip(*items)])
    for (lm, cam, identity, previous), b in zip(items, batch):
        a = regressor.regress(lm, cam, identity, previous)
        # the float32 expression MLP on a batch differs from a run per face by ~1e-7; it is the fit's prior
        assert np.allclose(a.fit.expression, b.fit.expression, rtol=0, atol=1e-8)
        assert np.allclose(a.fit.rotation_cam, b.fit.rotation_cam, rtol=0, atol=1e-8)
        assert np.allclose(a.fit.translation, b.fit.translation, rtol=0, atol=1e-8)
        assert a.fit.rms_px == pytest.approx(b.fit.rms_px, rel=1e-7) and a.fit.iterations == b.fit.iterations
        assert np.allclose(a.head_expression, b.head_expression, rtol=0, atol=1e-6)
        assert all(np.allclose(a.gaze[s], b.gaze[s], atol=1e-6) for s in ("left", "right"))


def test_regress_batch_on_cuda_matches_cpu(model, regressor):  # pragma: no cover - needs a GPU
    """The CUDA fit (a captured CUDA graph per padded batch size) equals the CPU fit, on a full bucket (8), a
    padded one (5 faces in the bucket of 8), on replay, and in eager mode."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no CUDA device is visible (torch.cuda.is_available() is False)")
    items = [list(x) for x in zip(*_tracked_faces(model, regressor, n=8))]
    cpu = regressor.regress_batch(*items)

    def same(gpu, ref):
        for a, b in zip(ref, gpu):
            assert np.allclose(a.fit.expression, b.fit.expression, rtol=0, atol=1e-8)
            assert np.allclose(a.fit.rotation_cam, b.fit.rotation_cam, rtol=0, atol=1e-8)
            assert np.allclose(a.fit.translation, b.fit.translation, rtol=0, atol=1e-8)
            assert a.fit.iterations == b.fit.iterations

    same(regressor.regress_batch(*items, device="cuda"), cpu)
    fitter = regressor._batched["cuda:0"]
    assert not fitter.graphs.errors, fitter.graphs.errors
    assert (8, 3) in fitter.graphs.graphs
    same(regressor.regress_batch(*items, device="cuda"), cpu)  # replay
    same(regressor.regress_batch(*[x[:5] for x in items], device="cuda"), cpu[:5])  # padded bucket
    fitter.graphs.enabled = False
    same(regressor.regress_batch(*items, device="cuda"), cpu)
    fitter.graphs.enabled = True
    # every bucket a scheduler uses captures (torch would pick MAGMA's uncapturable LU from 32 faces on)
    assert regressor.warm_batch("cuda", 64) == 7 and not fitter.graphs.errors, fitter.graphs.errors
    big = [x * 6 for x in items]  # 48 faces: the bucket of 64
    same(regressor.regress_batch(*big, device="cuda"), cpu * 6)
