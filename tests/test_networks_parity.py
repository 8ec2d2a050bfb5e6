"""Parity of the PyTorch ports of the MediaPipe face networks against LiteRT (ai-edge-litert), on real
faces, plus the reference values of shared docs/mediapipe_models.md section 7.2 and an independent
NumPy check of the attention model's custom ops (section 5.4)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.assets import AssetMissingError, find_asset
from engine.networks import preprocess as pp

IMAGES = ("d3d_000002.jpg", "3ddfa2_JianzhuGuo.jpg", "d3d_000031.jpg", "3ddfa2_trump_hillary.jpg")
MODELS = {
    "detector": "face_detection_short_range.tflite",
    "landmarks": "face_landmark.tflite",
    "attention": "face_landmark_with_attention.tflite",
    "iris": "iris_landmark.tflite",
}


# ---------------------------------------------------------------- fixtures

def _model_path(key: str) -> Path:
    try:
        return find_asset(f"mediapipe_models/{MODELS[key]}")
    except AssetMissingError:
        pytest.skip(f"{MODELS[key]} missing: run `facestream assets fetch`")


def _media_dir() -> Path:
    root = os.environ.get("FACESTREAM_ASSETS")
    if not root or not (Path(root) / "media").is_dir():
        pytest.skip("real-face media not found: set FACESTREAM_ASSETS to the shared assets folder (has media/)")
    return Path(root) / "media"


@pytest.fixture(scope="module")
def nets():
    from engine.networks.face_detector import load_face_detector
    from engine.networks.face_landmarks import load_attention_mesh, load_face_landmarks
    from engine.networks.iris import load_iris
    loaders = {"detector": load_face_detector, "landmarks": load_face_landmarks,
               "attention": load_attention_mesh, "iris": load_iris}
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = loaders[key](_model_path(key))
        return cache[key]
    return get


@pytest.fixture(scope="module")
def litert():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pytest.skip("ai-edge-litert not installed (pip install -e .[test])")
    cache = {}

    def run(key, x_nchw: torch.Tensor) -> dict[str, np.ndarray]:
        if key not in cache:
            it = Interpreter(model_path=str(_model_path(key)), num_threads=1)
            it.allocate_tensors()
            cache[key] = it
        it = cache[key]
        it.set_tensor(it.get_input_details()[0]["index"], x_nchw.permute(0, 2, 3, 1).contiguous().numpy())
        it.invoke()
        return {d["name"]: it.get_tensor(d["index"]).copy() for d in it.get_output_details()}
    return run


_IMG_CACHE: dict[str, np.ndarray] = {}


def load_image(name: str) -> np.ndarray:
    if name not in _IMG_CACHE:
        from PIL import Image
        _IMG_CACHE[name] = np.asarray(Image.open(_media_dir() / name).convert("RGB"))
    return _IMG_CACHE[name]


def detect(nets, img):
    x, info = pp.letterbox_detector_input(img)
    with torch.inference_mode():
        reg, cls = nets("detector")(x)
    return x, info, reg, cls, pp.decode_detections(reg, cls, info)


def face_crops(nets, img):
    """[(roi, crop [1,3,192,192])] for every detected face."""
    *_, dets = detect(nets, img)
    assert dets, "no face detected"
    out = []
    for d in dets:
        roi = pp.roi_from_detection(d, img.shape[1], img.shape[0])
        out.append((roi, pp.crop_roi(img, roi)))
    return out


def assert_close_rel(a, b, rel=1e-3, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max()
    assert err <= rel * max(1.0, np.abs(b).max()), f"{what}: max abs diff {err:.3g} (scale {np.abs(b).max():.3g})"


# ---------------------------------------------------------------- LiteRT parity

@pytest.mark.parametrize("name", IMAGES)
def test_detector_parity(nets, litert, name):
    img = load_image(name)
    x, info, reg, cls, dets = detect(nets, img)
    ref = litert("detector", x)
    assert_close_rel(reg.numpy(), ref["regressors"], what="regressors")
    assert_close_rel(cls.numpy(), ref["classificators"], what="classificators")
    ref_dets = pp.decode_detections(torch.from_numpy(ref["regressors"]), torch.from_numpy(ref["classificators"]), info)
    assert len(dets) == len(ref_dets) >= 1
    to_input_px = pp.DETECTOR_SIZE / info.side  # image px -> 128-px network input px
    for d, r in zip(dets, ref_dets):
        assert abs(d.score - r.score) < 1e-3
        assert np.abs(d.keypoints - r.keypoints).max() * to_input_px < 0.5
        assert np.abs(np.subtract(d.box, r.box)).max() * to_input_px < 0.5


@pytest.mark.parametrize("name", IMAGES)
def test_face_landmark_parity(nets, litert, name):
    img = load_image(name)
    for roi, crop in face_crops(nets, img):
        with torch.inference_mode():
            pts, presence = nets("landmarks")(crop)
        ref = litert("landmarks", crop)
        ref_pts = ref["conv2d_21"].reshape(1, 468, 3)
        assert_close_rel(pts.numpy(), ref_pts, what="mesh")
        assert abs(presence.item() - ref["conv2d_31"].item()) < 1e-2
        assert presence.item() > 0  # a face
        assert np.abs(pts.numpy()[..., :2] - ref_pts[..., :2]).max() < 0.5  # 192-px crop units


@pytest.mark.parametrize("name", IMAGES)
def test_iris_parity(nets, litert, name):
    img = load_image(name)
    roi, crop = face_crops(nets, img)[0]
    with torch.inference_mode():
        pts, _ = nets("landmarks")(crop)
        face_px = pp.project_landmarks(pts[0], roi, pp.LANDMARK_SIZE)
        eyes, rois = pp.crop_eyes(img, face_px)
        contours, iris = nets("iris")(eyes)
    for k in range(2):
        ref = litert("iris", eyes[k:k + 1])
        ref_c = ref["output_eyes_contours_and_brows"].reshape(71, 3)
        ref_i = ref["output_iris"].reshape(5, 3)
        assert_close_rel(contours[k].numpy(), ref_c, what="contours")
        assert_close_rel(iris[k].numpy(), ref_i, what="iris")
        assert np.abs(contours[k, :, :2].numpy() - ref_c[:, :2]).max() < 0.5  # 64-px crop units
        assert np.abs(iris[k, :, :2].numpy() - ref_i[:, :2]).max() < 0.5


def test_batched_forward_matches_single(nets):
    torch.manual_seed(0)
    for key, size in (("detector", 128), ("landmarks", 192), ("iris", 64), ("attention", 192)):
        x = torch.rand(2, 3, size, size) * (2 if key == "detector" else 1) - (1 if key == "detector" else 0)
        with torch.inference_mode():
            batched = nets(key)(x)
            single = [nets(key)(x[i:i + 1]) for i in range(2)]
        for j, out in enumerate(batched):
            for i in range(2):
                assert torch.allclose(out[i], single[i][j][0], atol=1e-4, rtol=1e-4), (key, j, i)


# ---------------------------------------------------------------- reference values (section 7.2)

def test_reference_values_d3d_000002(nets):
    img = load_image("d3d_000002.jpg")
    H, W = img.shape[:2]
    _, _, _, cls, dets = detect(nets, img)
    assert int((torch.sigmoid(cls) > 0.5).sum()) == 6
    assert len(dets) == 1
    d = dets[0]
    assert abs(d.score - 0.9296) < 1e-3
    np.testing.assert_allclose(d.box, (115.7, 158.7, 315.4, 358.4), atol=0.3)
    ref_kp = [(146.8, 213.3), (226.1, 213.5), (163.4, 261.7), (171.9, 301.9), (137.2, 229.0), (308.2, 233.9)]
    np.testing.assert_allclose(d.keypoints, ref_kp, atol=0.3)

    roi = pp.roi_from_detection(d, W, H)
    np.testing.assert_allclose((roi.cx, roi.cy, roi.w, roi.h), (215.5, 258.5, 299.6, 299.6), atol=0.3)
    assert abs(math.degrees(roi.theta) - 0.21) < 0.05

    crop = pp.crop_roi(img, roi)
    with torch.inference_mode():
        pts, presence = nets("landmarks")(crop)
        _, att_presence = nets("attention")(crop)
    assert abs(presence.item() - 26.14) < 0.1
    assert abs(att_presence.item() - 34.72) < 0.1
    P = pp.project_landmarks(pts[0], roi, pp.LANDMARK_SIZE).numpy()
    ref = {1: (160.3, 259.2, -0.104), 33: (128.2, 206.4, 0.071), 133: (159.1, 208.9, 0.026),
           263: (242.3, 208.1, -0.034), 362: (201.7, 209.9, -0.021), 61: (146.9, 288.2, None),
           291: (227.9, 290.2, None), 152: (181.6, 356.3, None), 10: (174.9, 141.4, None)}
    for i, (x, y, z) in ref.items():
        assert np.hypot(P[i, 0] - x, P[i, 1] - y) < 1.0, (i, P[i])
        if z is not None:
            assert abs(P[i, 2] / W - z) < 0.003, (i, P[i, 2] / W)

    with torch.inference_mode():
        eyes, rois = pp.crop_eyes(img, P)
        _, iris = nets("iris")(eyes)
    np.testing.assert_allclose([rois[0].w, rois[1].w], [71.1, 93.4], atol=0.2)
    for k, ref_c in enumerate([(141.9, 205.8), (221.3, 206.6)]):
        c = pp.project_eye_landmarks(iris[k], rois[k], flipped=(k == 1))[0].numpy()
        assert np.hypot(c[0] - ref_c[0], c[1] - ref_c[1]) < 1.0, (k, c)


# ---------------------------------------------------------------- preprocessing

def test_crop_roi_is_corner_aligned_and_projection_inverts():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    # ROI = whole image, crop size == image size: output pixel u samples image pixel u (u/S, no +0.5).
    roi = pp.Roi(24.0, 24.0, 48.0, 48.0, 0.0)
    crop = pp.crop_roi(img, roi, size=48)[0]
    np.testing.assert_allclose(crop.permute(1, 2, 0).numpy() * 255, img, atol=1e-3)
    # Shift by half a pixel: bilinear mix of neighbours, replicate border on the right.
    crop = pp.crop_roi(img, pp.Roi(24.5, 24.0, 48.0, 48.0, 0.0), size=48, quantize=False)[0].permute(1, 2, 0).numpy() * 255
    f = img.astype(np.float64)
    np.testing.assert_allclose(crop[:, :47], (f[:, :47] + f[:, 1:]) / 2, atol=1e-3)
    np.testing.assert_allclose(crop[:, 47], f[:, 47], atol=1e-3)
    # Projection maps crop pixel (u, v) back to where it was sampled.
    roi = pp.Roi(31.3, 18.2, 25.0, 25.0, 0.4)
    uv = torch.tensor([[0.0, 0.0, 0.0], [17.0, 5.0, 3.0], [191.0, 100.0, -4.0]])
    p = pp.project_landmarks(uv, roi, 192).numpy()
    c, s = math.cos(0.4), math.sin(0.4)
    for (u, v, z), (x, y, zz) in zip(uv.numpy(), p):
        du, dv = (u / 192 - 0.5) * 25, (v / 192 - 0.5) * 25
        assert abs(x - (31.3 + c * du - s * dv)) < 1e-4 and abs(y - (18.2 + s * du + c * dv)) < 1e-4
        assert abs(zz - z / 192 * 25) < 1e-5


def test_batched_projection_equals_per_face_projection():
    """`project_landmarks_batch` (the landmark stage's whole batch at once) gives each face's `project_landmarks`
    bit for bit, rotated boxes of different sizes included."""
    torch.manual_seed(0)
    pts = torch.rand(4, 478, 3) * pp.LANDMARK_SIZE
    rois = [pp.Roi(100.3 + i, 120.7 - i, 180 + 3.1 * i, 170 + i, 0.3 * i - 0.4) for i in range(4)]
    batch = pp.project_landmarks_batch(pts, rois, pp.LANDMARK_SIZE)
    for i, roi in enumerate(rois):
        assert torch.equal(batch[i], pp.project_landmarks(pts[i], roi, pp.LANDMARK_SIZE))


def test_letterbox_pads_black_to_minus_one():
    img = np.full((50, 100, 3), 255, np.uint8)
    x, info = pp.letterbox_detector_input(img)
    assert x.shape == (1, 3, 128, 128) and info.side == 100
    assert torch.all(x[..., :20, :] == -1) and torch.all(x[..., 108:, :] == -1)
    # corner-aligned mapping (u/S): the last column samples x = 99.2, half outside -> mixed with black
    assert torch.all(x[..., 40:88, :127] == 1) and torch.all(x[..., 40:88, 127] < 1)


def test_no_detection_on_blank_image(nets):
    _model_path("detector")
    *_, dets = detect(nets, np.zeros((240, 320, 3), np.uint8))
    assert dets == []


def test_roi_from_landmarks_rotation():
    pts = torch.zeros(468, 2)
    pts[:, 0] = torch.linspace(100, 200, 468)
    pts[:, 1] = torch.linspace(50, 130, 468)
    pts[33] = torch.tensor([120.0, 80.0])
    pts[263] = torch.tensor([180.0, 110.0])
    roi = pp.roi_from_landmarks(pts)
    assert abs(roi.theta - math.atan2(30, 60)) < 1e-9
    assert (roi.cx, roi.cy) == (150.0, 90.0) and roi.w == roi.h == pytest.approx(150.0)


# ---------------------------------------------------------------- attention model custom ops (section 5.4)

def _np_landmarks2transform(lm, subset, left, right, out=16, scale=1.5):
    """Straight from the doc: rotate subset by r = -phi, box, centre back-rotated, compose matrices."""
    lm = np.asarray(lm, np.float64)
    phi = math.atan2(lm[right, 1] - lm[left, 1], lm[right, 0] - lm[left, 0])
    r = 0.0 - phi

    def rot(a):
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = np.array([rot(r) @ lm[i, :2] for i in sorted(set(subset))])
    lo, hi = pts.min(0), pts.max(0)
    cw, ch = hi - lo
    c = rot(-r) @ ((lo + hi) / 2)

    def h3(m2=None, t=(0.0, 0.0)):
        m = np.eye(3)
        if m2 is not None:
            m[:2, :2] = m2
        m[:2, 2] = t
        return m
    M = h3(t=c) @ h3(rot(phi)) @ h3(np.diag([scale * cw / out, scale * ch / out])) @ h3(t=(-out / 2, -out / 2))
    return M  # 3x3: rows x, y of the 4x4 are [M00 M01 0 M02], [M10 M11 0 M12]


def _np_transform_tensor_bilinear(feat_hwc, M, out_h=16, out_w=16):
    H, W, C = feat_hwc.shape
    out = np.zeros((out_h, out_w, C))

    def read(y, x):
        return feat_hwc[y, x] if 0 <= y < H and 0 <= x < W else np.zeros(C)
    for v in range(out_h):
        for u in range(out_w):
            X = M[0, 0] * (u + 0.5) + M[0, 1] * (v + 0.5) + M[0, 3] - 0.5
            Y = M[1, 0] * (u + 0.5) + M[1, 1] * (v + 0.5) + M[1, 3] - 0.5
            if X < 0 or X > W - 1 or Y < 0 or Y > H - 1:
                continue  # all channels zero
            x0, y0 = math.floor(X), math.floor(Y)
            ax, ay = X - x0, Y - y0
            out[v, u] = ((1 - ay) * ((1 - ax) * read(y0, x0) + ax * read(y0, x0 + 1))
                         + ay * ((1 - ax) * read(y0 + 1, x0) + ax * read(y0 + 1, x0 + 1)))
    return out


def test_attention_custom_ops_match_numpy(nets):
    from engine.networks.face_landmarks import (LEFT_EYE_IDX, LEFT_EYE_ROT, LIPS_IDX, LIPS_ROT, RIGHT_EYE_IDX,
                                                RIGHT_EYE_ROT, landmarks_to_transform_matrix,
                                                transform_landmarks, transform_tensor_bilinear)
    img = load_image("d3d_000002.jpg")
    _, crop = face_crops(nets, img)[0]
    with torch.inference_mode():
        mesh = nets("attention").raw(crop)["mesh"] * 0.25
    # batch: the real mesh, and a rotated + shifted copy
    a = 0.6
    R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    moved = mesh.clone()
    moved[..., :2] = (mesh[..., :2] - 24) @ R.T + torch.tensor([30.0, 20.0])
    lm = torch.cat([mesh, moved])
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 32, 48, 48, generator=g)
    for idx, (left, right) in ((LIPS_IDX, LIPS_ROT), (LEFT_EYE_IDX, LEFT_EYE_ROT), (RIGHT_EYE_IDX, RIGHT_EYE_ROT)):
        M = landmarks_to_transform_matrix(lm, torch.tensor(idx), left, right)
        for b in range(2):
            ref = _np_landmarks2transform(lm[b].numpy(), idx, left, right)
            got = M[b].numpy().astype(np.float64)
            np.testing.assert_allclose(got[:2, [0, 1, 3]], ref[:2], atol=1e-4)
        # sampling, including a matrix pushed half outside the map (all-or-nothing zeros)
        M_out = M.clone()
        M_out[1, 0, 3] = 48 - 8 * M_out[1, 0, 0].abs() - 0.3  # straddle the right border
        for Mx in (M, M_out):
            got = transform_tensor_bilinear(feat, Mx)
            for b in range(2):
                ref = _np_transform_tensor_bilinear(feat[b].permute(1, 2, 0).double().numpy(), Mx[b].double().numpy())
                np.testing.assert_allclose(got[b].permute(1, 2, 0).numpy(), ref, atol=1e-4)
        zeros = (transform_tensor_bilinear(feat, M_out)[1].abs().sum(0) == 0).sum().item()
        assert 0 < zeros < 256  # the border case really is exercised
        pts = torch.randn(2, 9, 2, generator=g) * 20 + 30
        ref = np.einsum("bij,bnj->bni", M[:, :2, :2].double().numpy(), pts.double().numpy()) + M[:, None, :2, 3].double().numpy()
        np.testing.assert_allclose(transform_landmarks(pts, M).numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("name", IMAGES[:3])
def test_attention_mesh_agrees_with_iris_and_mesh_models(nets, name):
    from engine.networks.face_landmarks import LEFT_EYE_IDX, LIPS_IDX, RIGHT_EYE_IDX
    img = load_image(name)
    roi, crop = face_crops(nets, img)[0]
    with torch.inference_mode():
        att, att_presence = nets("attention")(crop)
        pts, _ = nets("landmarks")(crop)
        assert att.shape == (1, 478, 3) and torch.isfinite(att).all() and att_presence.item() > 0
        A = pp.project_landmarks(att[0], roi, pp.LANDMARK_SIZE)
        P = pp.project_landmarks(pts[0], roi, pp.LANDMARK_SIZE)
        eyes, rois = pp.crop_eyes(img, P)
        _, iris = nets("iris")(eyes)
    # attention iris centres (468: image-left eye 33/133, 473: image-right eye 362/263) vs IrisNet
    for k, a_idx in enumerate((468, 473)):
        c = pp.project_eye_landmarks(iris[k], rois[k], flipped=(k == 1))[0, :2]
        assert (A[a_idx, :2] - c).norm() < 2.0, (name, k, A[a_idx, :2], c)
    # refined lips/eyes stay near the 468 model's points; z of those points is the mesh's z
    # (in 192-px crop units: the refined points differ by design, 1.1 px mesh-to-mesh on the test crop)
    refined = list(LIPS_IDX) + list(LEFT_EYE_IDX) + list(RIGHT_EYE_IDX)
    assert (att[0, refined, :2] - pts[0, refined, :2]).norm(dim=1).mean() < 3.0
    raw = nets("attention").raw(crop)
    assert torch.equal(att[0, refined, 2], raw["mesh"][0, refined, 2])
    assert torch.allclose(att[0, 468:473, 2], raw["mesh"][0, list(LEFT_EYE_IDX[:16]), 2].mean().expand(5))
    # iris points are in the crop, centre first and 4 points around it
    iris_l = att[0, 468:473, :2]
    assert ((iris_l[1:] - iris_l[0]).norm(dim=1) < 15).all()
