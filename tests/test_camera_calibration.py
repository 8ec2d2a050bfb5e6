"""Camera calibration: field-of-view intrinsics, checkerboard calibration of a rendered video, JSON round trip."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calibration.camera import CalibrationError, CameraCalibration, default_calibration, from_fov
from calibration.synthetic_board import render_board, render_board_frames, write_board_video
from engine.geometry import Camera
from engine.media import MediaSource

PATTERN = (9, 6)
SQUARE_CM = 2.5


@pytest.fixture(scope="module")
def true_camera() -> Camera:
    f = 0.5 * 640 / math.tan(math.radians(60.0) / 2)  # 60 degree horizontal field of view
    return Camera(f, f, 332.5, 231.0, 640, 480)  # principal point off the image centre


def test_checkerboard_video_calibrates_back_to_known_intrinsics(tmp_path, true_camera):
    pytest.importorskip("cv2")
    from calibration.camera import calibrate_checkerboard

    path = write_board_video(tmp_path / "board.mp4", true_camera, n_frames=20, pattern=PATTERN,
                             square_cm=SQUARE_CM, seed=3)
    frames = [f.rgb for f in MediaSource(path).frames()]  # the real decode path (H.264 artefacts included)
    assert len(frames) == 20 and frames[0].shape == (480, 640, 3)
    cal = calibrate_checkerboard(frames, PATTERN, SQUARE_CM, name="synthetic")
    c = true_camera
    assert cal.source == "checkerboard" and cal.name == "synthetic" and (cal.width, cal.height) == (640, 480)
    assert abs(cal.fx - c.fx) / c.fx < 0.02, (cal.fx, c.fx)
    assert abs(cal.fy - c.fy) / c.fy < 0.02, (cal.fy, c.fy)
    assert abs(cal.cx - c.cx) / c.width < 0.02, (cal.cx, c.cx)
    assert abs(cal.cy - c.cy) / c.height < 0.02, (cal.cy, c.cy)
    assert cal.rms_px is not None and cal.rms_px < 1.0
    assert cal.frames_used is not None and 5 <= cal.frames_used <= 20
    assert len(cal.distortion) == 5 and max(abs(v) for v in cal.distortion) < 0.1
    cam = cal.to_camera()
    assert isinstance(cam, Camera) and (cam.fx, cam.cy, cam.width) == (cal.fx, cal.cy, 640)
    # what was measured survives the profile's JSON
    again = CameraCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal


def test_max_frames_picks_a_diverse_subset(true_camera):
    pytest.importorskip("cv2")
    from calibration.camera import calibrate_checkerboard

    frames = render_board_frames(true_camera, 16, PATTERN, SQUARE_CM, seed=5)
    cal = calibrate_checkerboard(frames, PATTERN, SQUARE_CM, max_frames=8)
    assert cal.frames_used <= 8
    assert abs(cal.fx - true_camera.fx) / true_camera.fx < 0.02
    assert abs(cal.cx - true_camera.cx) / true_camera.width < 0.02


def test_video_without_a_board_is_a_clear_error(tmp_path, true_camera):
    pytest.importorskip("cv2")
    from calibration.camera import calibrate_checkerboard

    path = write_board_video(tmp_path / "empty.mp4", true_camera, n_frames=0, blank_frames=8)
    with pytest.raises(CalibrationError, match=r"board found in 0 of 8 frames; need at least 5 with the whole "
                                               r"board visible"):
        calibrate_checkerboard((f.rgb for f in MediaSource(path).frames()), PATTERN, SQUARE_CM)


def test_too_few_board_views_is_a_clear_error(true_camera):
    pytest.importorskip("cv2")
    from calibration.camera import calibrate_checkerboard

    rng = np.random.default_rng(0)
    frames = render_board_frames(true_camera, 3, PATTERN, SQUARE_CM, seed=1)
    frames += [render_board(true_camera, None, rng=rng) for _ in range(5)]
    with pytest.raises(CalibrationError, match=r"board found in 3 of 8 frames"):
        calibrate_checkerboard(frames, PATTERN, SQUARE_CM)
    with pytest.raises(CalibrationError, match="first frame was 640x480"):
        calibrate_checkerboard(frames + [np.zeros((240, 320, 3), np.uint8)], PATTERN, SQUARE_CM)
    assert issubclass(CalibrationError, ValueError)


def test_from_fov_and_default():
    cal = from_fov("webcam", 1280, 720, 70.0)
    assert cal.source == "user-fov" and cal.rms_px is None and cal.frames_used is None
    assert cal.fx == cal.fy and abs(cal.hfov_deg - 70.0) < 1e-9
    assert (cal.cx, cal.cy) == (640.0, 360.0) and cal.distortion == [0.0] * 5
    default = default_calibration("webcam", 640, 480)
    assert default.source == "default-fov"
    assert default.to_camera() == Camera.from_fov(640, 480)
    with pytest.raises(ValueError, match="field of view"):
        from_fov("webcam", 640, 480, 200.0)
    with pytest.raises(ValueError, match="source"):
        from_fov("webcam", 640, 480, 60.0, source="checkerboard")


def test_dict_round_trip_is_exact():
    cal = CameraCalibration("Logitech C920", 1920, 1080, 1402.123456789012, 1399.87654321, 955.5, 541.25,
                            [0.1234567890123, -0.25, 1e-4, -2e-5, 0.0], "checkerboard", 0.3141592653589793, 17)
    d = cal.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types
    back = CameraCalibration.from_dict(json.loads(json.dumps(d)))
    assert back == cal and back.to_dict() == d
    fov = from_fov("laptop", 640, 480, 62.5)
    assert CameraCalibration.from_dict(fov.to_dict()) == fov


@pytest.mark.parametrize("mutate, message", [
    (lambda d: {"format": "facestream-profile", "version": 1}, "not a camera calibration"),
    (lambda d: [1, 2, 3], "JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "fx"}, "missing fx"),
    (lambda d: {**d, "focal": 500.0}, "unknown focal"),
    (lambda d: {**d, "fx": "500"}, "fx must be a finite number"),
    (lambda d: {**d, "fy": float("nan")}, "fy must be a finite number"),
    (lambda d: {**d, "fx": -3.0}, "fx -3.0 px is implausible"),
    (lambda d: {**d, "width": 0}, "width must be an integer"),
    (lambda d: {**d, "height": 480.0}, "height must be an integer"),
    (lambda d: {**d, "cx": 5000.0}, "principal point"),
    (lambda d: {**d, "distortion": [0.0, 0.0]}, "list of 5 numbers"),
    (lambda d: {**d, "distortion": [0.0, 0.0, None, 0.0, 0.0]}, "finite number"),
    (lambda d: {**d, "source": "guess"}, "source 'guess'"),
    (lambda d: {**d, "rms_px": -1.0}, "negative"),
    (lambda d: {**d, "frames_used": 2.5}, "frames_used"),
    (lambda d: {**d, "rms_px": None}, "needs rms_px"),
    (lambda d: {**d, "name": ""}, "name"),
])
def test_from_dict_rejects_foreign_or_corrupt(mutate, message):
    good = CameraCalibration("cam", 640, 480, 550.0, 551.0, 321.0, 239.0, [0.0] * 5, "checkerboard", 0.2, 12).to_dict()
    with pytest.raises(ValueError, match=message):
        CameraCalibration.from_dict(mutate(good))


def test_scaled_to_same_aspect_only():
    cal = CameraCalibration("cam", 1280, 720, 1000.0, 1001.0, 639.5, 359.5, [0.1, 0, 0, 0, 0], "checkerboard", 0.4, 20)
    half = cal.scaled_to(640, 360)
    assert (half.width, half.height) == (640, 360)
    assert half.fx == 500.0 and half.fy == 500.5
    assert (half.cx, half.cy) == (319.5, 179.5)  # the image centre stays the image centre
    assert half.distortion == cal.distortion and half.source == "checkerboard" and half.rms_px == pytest.approx(0.2)
    assert cal.scaled_to(1920, 1080).fx == pytest.approx(1500.0)
    assert cal.scaled_to(854, 480).width == 854  # rounded 16:9 modes are the same aspect
    with pytest.raises(ValueError, match="another aspect ratio"):
        cal.scaled_to(640, 480)
    fov = from_fov("cam", 1280, 720, 70.0).scaled_to(640, 360)
    fresh = Camera.from_fov(640, 360, 70.0)  # the same as field-of-view intrinsics made at 640x360
    got = fov.to_camera()
    assert (got.fx, got.fy, got.cx, got.cy) == pytest.approx((fresh.fx, fresh.fy, fresh.cx, fresh.cy))
