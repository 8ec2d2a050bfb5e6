"""Camera intrinsics for one named camera: from a field of view (stated default or the user's) or measured
from a checkerboard video with OpenCV, with the reprojection error reported.

Pixel convention (OpenCV): the centre of pixel (i, j) is at (x, y) = (j, i), so the image spans
[-0.5, width - 0.5]. `Camera.from_fov` puts the principal point at (width / 2, height / 2); the half-pixel
difference from the OpenCV centre (width - 1) / 2 is far below anything the tracker can resolve.

OpenCV (`opencv-python-headless`) is imported only by `calibrate_checkerboard`; the rest works without it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from engine.geometry import DEFAULT_HFOV_DEG, Camera

SOURCES = ("default-fov", "user-fov", "checkerboard")
MIN_VIEWS = 5  # views of the whole board that calibrateCamera needs for a usable answer
_KEYS = ("name", "width", "height", "fx", "fy", "cx", "cy", "distortion", "source", "rms_px", "frames_used")
_MAX_SIDE = 32768  # larger than any camera mode; catches corrupt sizes
_DETECT_MAX_SIDE = 1280  # corners are found on a downscaled copy of larger frames, then refined at full size


class CalibrationError(ValueError):
    """Calibration input that cannot give intrinsics; the message is meant for the user as it is."""


@dataclass
class CameraCalibration:
    """Pinhole intrinsics in pixels for one camera mode (width x height), plus how they were obtained."""

    name: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion: list[float] = field(default_factory=lambda: [0.0] * 5)  # OpenCV k1, k2, p1, p2, k3
    source: str = "user-fov"  # one of SOURCES
    rms_px: float | None = None  # RMS reprojection error of the checkerboard corners, pixels
    frames_used: int | None = None  # board views that went into calibrateCamera

    @property
    def hfov_deg(self) -> float:
        return math.degrees(2.0 * math.atan(0.5 * self.width / self.fx))

    @property
    def vfov_deg(self) -> float:
        return math.degrees(2.0 * math.atan(0.5 * self.height / self.fy))

    def to_camera(self) -> Camera:
        """The engine's pinhole camera (distortion is not modelled there)."""
        return Camera(float(self.fx), float(self.fy), float(self.cx), float(self.cy), int(self.width), int(self.height))

    def scaled_to(self, width: int, height: int) -> "CameraCalibration":
        """The same camera at another resolution with the same aspect ratio (a scaled sensor readout).

        Raises ValueError for another aspect ratio: that is a cropped mode whose intrinsics cannot be
        derived from these.
        """
        width, height = _check_size(width, height)
        sx, sy = width / self.width, height / self.height
        if abs(sx - sy) > 0.01 * max(sx, sy):
            raise ValueError(f"camera {self.name!r} was calibrated at {self.width}x{self.height}; "
                             f"{width}x{height} has another aspect ratio, so its intrinsics cannot be scaled from it")
        # checkerboard intrinsics use OpenCV's pixel-centre convention (pixel centres stay pixel centres);
        # field-of-view ones put the centre at (width / 2, height / 2), as Camera.from_fov does
        half = 0.5 if self.source == "checkerboard" else 0.0
        return CameraCalibration(
            name=self.name, width=width, height=height,
            fx=self.fx * sx, fy=self.fy * sy,
            cx=(self.cx + half) * sx - half, cy=(self.cy + half) * sy - half,
            distortion=list(self.distortion),  # defined on normalised coordinates: unchanged by scaling
            source=self.source,
            rms_px=None if self.rms_px is None else self.rms_px * 0.5 * (sx + sy),
            frames_used=self.frames_used,
        )

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "name": self.name, "width": int(self.width), "height": int(self.height),
            "fx": float(self.fx), "fy": float(self.fy), "cx": float(self.cx), "cy": float(self.cy),
            "distortion": [float(v) for v in self.distortion], "source": self.source,
            "rms_px": None if self.rms_px is None else float(self.rms_px),
            "frames_used": None if self.frames_used is None else int(self.frames_used),
        }

    @classmethod
    def from_dict(cls, d) -> "CameraCalibration":
        """Read `to_dict()` output back; anything else (foreign or corrupt) raises ValueError saying why."""
        if not isinstance(d, dict):
            raise ValueError(f"camera calibration must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        extra = sorted(str(k) for k in d if k not in _KEYS)
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(extra)}"] if extra else [])
            raise ValueError(f"not a camera calibration ({'; '.join(parts)})")
        name = d["name"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError("camera calibration name must be a non-empty string")
        width, height = _check_size(d["width"], d["height"])
        fx, fy = _number(d, "fx"), _number(d, "fy")
        for k, v in (("fx", fx), ("fy", fy)):
            if not 0.05 * max(width, height) <= v <= 100.0 * max(width, height):
                raise ValueError(f"camera calibration {k} {v} px is implausible for a {width}x{height} image")
        cx, cy = _number(d, "cx"), _number(d, "cy")
        if not -0.5 <= cx <= width - 0.5 or not -0.5 <= cy <= height - 0.5:
            raise ValueError(f"camera calibration principal point ({cx}, {cy}) lies outside the "
                             f"{width}x{height} image")
        dist = d["distortion"]
        if not isinstance(dist, list) or len(dist) != 5:
            raise ValueError("camera calibration distortion must be a list of 5 numbers (k1, k2, p1, p2, k3)")
        dist = [_number({"distortion": v}, "distortion") for v in dist]
        source = d["source"]
        if source not in SOURCES:
            raise ValueError(f"camera calibration source {source!r} is not one of {', '.join(SOURCES)}")
        rms = d["rms_px"]
        if rms is not None:
            rms = _number(d, "rms_px")
            if rms < 0:
                raise ValueError(f"camera calibration rms_px {rms} is negative")
        frames = d["frames_used"]
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise ValueError(f"camera calibration frames_used must be a positive integer or null, got {frames!r}")
        if source == "checkerboard" and (rms is None or frames is None):
            raise ValueError("a checkerboard calibration needs rms_px and frames_used")
        return cls(name, width, height, fx, fy, cx, cy, dist, source, rms, frames)


def _number(d: dict, key: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"camera calibration {key} must be a finite number, got {v!r}")
    return float(v)


def _check_size(width, height) -> tuple[int, int]:
    for k, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= _MAX_SIDE:
            raise ValueError(f"camera {k} must be an integer in 1..{_MAX_SIDE}, got {v!r}")
    return int(width), int(height)


# -------------------------------------------------------------------- field of view

def from_fov(name: str, width: int, height: int, hfov_deg: float, source: str = "user-fov") -> CameraCalibration:
    """Square pixels, centred principal point, no distortion, from a horizontal field of view."""
    if source not in ("default-fov", "user-fov"):
        raise ValueError(f"from_fov source must be 'default-fov' or 'user-fov', got {source!r}")
    width, height = _check_size(width, height)
    cam = Camera.from_fov(width, height, float(hfov_deg))  # validates the angle
    return CameraCalibration(name, width, height, cam.fx, cam.fy, cam.cx, cam.cy, [0.0] * 5, source, None, None)


def default_calibration(name: str, width: int, height: int) -> CameraCalibration:
    """What the tracker assumes for an unknown camera (engine.geometry.DEFAULT_HFOV_DEG)."""
    return from_fov(name, width, height, DEFAULT_HFOV_DEG, source="default-fov")


# -------------------------------------------------------------------- checkerboard

def board_points(pattern: tuple[int, int], square_size: float = 1.0) -> np.ndarray:
    """(cols * rows, 3) inner-corner positions on the board plane, in OpenCV's detection order."""
    cols, rows = pattern
    grid = np.mgrid[0:cols, 0:rows].T.reshape(-1, 2)  # x fastest, then y: row by row
    pts = np.zeros((cols * rows, 3), np.float32)
    pts[:, :2] = grid * float(square_size)
    return pts


def _gray(frame) -> np.ndarray:
    img = np.asarray(getattr(frame, "rgb", frame))  # engine.media.Frame or an array
    if img.ndim == 2:
        gray = img
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        rgb = img[..., :3].astype(np.float32)
        gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        raise CalibrationError(f"frames must be (H, W) or (H, W, 3) images, got shape {img.shape}")
    if gray.dtype != np.uint8:
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(gray)


def _detect(cv2, gray: np.ndarray, pattern: tuple[int, int]) -> np.ndarray | None:
    """Inner corners (N, 2) float32 refined to sub-pixel, or None when the whole board is not found."""
    h, w = gray.shape
    flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE | cv2.CALIB_CB_FAST_CHECK
    scale = min(1.0, _DETECT_MAX_SIDE / max(h, w))
    small = gray if scale == 1.0 else cv2.resize(gray, (round(w * scale), round(h * scale)),
                                                 interpolation=cv2.INTER_AREA)
    found, corners = cv2.findChessboardCorners(small, pattern, None, flags)
    if not found or corners is None:
        return None
    corners = corners.reshape(-1, 2).astype(np.float32)
    if scale != 1.0:
        corners = (corners + 0.5) / np.float32(scale) - 0.5
    # sub-pixel window: well inside one square so that neighbouring corners stay out of it
    cols, rows = pattern
    grid = corners.reshape(rows, cols, 2)
    spacing = min(np.linalg.norm(np.diff(grid, axis=1), axis=-1).min(initial=np.inf),
                  np.linalg.norm(np.diff(grid, axis=0), axis=-1).min(initial=np.inf))
    half = int(np.clip(0.4 * spacing, 2, 11)) if np.isfinite(spacing) else 5
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 40, 1e-3)
    refined = cv2.cornerSubPix(gray, corners.reshape(-1, 1, 2).copy(), (half, half), (-1, -1), criteria)
    return refined.reshape(-1, 2)


def _pose_feature(corners: np.ndarray, pattern: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The four outer corners of a detected board, normalised by the image size: position, scale and
    perspective (tilt) of the view in 8 numbers."""
    cols, rows = pattern
    g = corners.reshape(rows, cols, 2)
    quad = np.stack([g[0, 0], g[0, -1], g[-1, -1], g[-1, 0]]) / np.array(size, np.float32)
    return quad.reshape(-1)


def select_diverse(features: list[np.ndarray], k: int) -> list[int]:
    """Greedy farthest-point choice of k views (indices, in input order) that differ most in board pose.

    Starts from the view nearest the mean pose; a board seen rotated by 180 degrees in the image (OpenCV may
    order its corners from either end) counts as the same pose."""
    n = len(features)
    if n <= k:
        return list(range(n))
    f = np.stack(features)
    f_rev = f.reshape(n, 4, 2)[:, [2, 3, 0, 1]].reshape(n, 8)

    def dist_to(i: int) -> np.ndarray:
        return np.minimum(np.linalg.norm(f - f[i], axis=1), np.linalg.norm(f_rev - f[i], axis=1))

    first = int(np.argmin(np.linalg.norm(f - f.mean(0), axis=1)))
    chosen = [first]
    nearest = dist_to(first)
    while len(chosen) < k:
        i = int(np.argmax(nearest))
        chosen.append(i)
        nearest = np.minimum(nearest, dist_to(i))
    return sorted(chosen)


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise CalibrationError("checkerboard calibration needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def calibrate_checkerboard(frames: Iterable, pattern: tuple[int, int] = (9, 6), square_size: float = 1.0,
                           name: str = "camera", max_frames: int = 40, frame_step: int = 1,
                           fix_k3: bool = True) -> CameraCalibration:
    """Intrinsics and distortion from views of a planar checkerboard.

    frames: RGB (H, W, 3) uint8 arrays (or engine.media.Frame objects, or grayscale arrays), all one size.
    pattern: inner corners (columns, rows), e.g. (9, 6) for a board of 10 x 7 squares.
    square_size: side of one square (any unit; it does not change the intrinsics).
    max_frames: at most this many board views go into calibrateCamera, chosen for pose diversity.
    frame_step: look for the board in every frame_step-th frame only (long videos at high frame rates).
    fix_k3: hold the 6th-order radial term at 0 (webcam lenses; k3 overfits with few views).
    Raises CalibrationError when the board is seen in fewer than 5 frames or the solve fails.
    """
    cols, rows = (int(v) for v in pattern)
    if cols < 2 or rows < 2:
        raise ValueError(f"pattern needs at least 2x2 inner corners, got {cols}x{rows}")
    if not square_size > 0:
        raise ValueError(f"square_size must be positive, got {square_size}")
    if max_frames < MIN_VIEWS:
        raise ValueError(f"max_frames must be at least {MIN_VIEWS}, got {max_frames}")
    pattern = (cols, rows)
    cv2 = _import_cv2()

    size: tuple[int, int] | None = None
    seen = 0
    views: list[np.ndarray] = []
    for i, frame in enumerate(frames):
        if i % max(1, int(frame_step)):
            continue
        gray = _gray(frame)
        if size is None:
            size = (gray.shape[1], gray.shape[0])
        elif (gray.shape[1], gray.shape[0]) != size:
            raise CalibrationError(f"frame {i} is {gray.shape[1]}x{gray.shape[0]} but the first frame was "
                                   f"{size[0]}x{size[1]}; calibrate one camera mode at a time")
        seen += 1
        corners = _detect(cv2, gray, pattern)
        if corners is not None:
            views.append(corners)
    if len(views) < MIN_VIEWS:
        raise CalibrationError(f"board found in {len(views)} of {seen} frames; need at least {MIN_VIEWS} with the "
                               f"whole board visible (looking for {cols}x{rows} inner corners: check --pattern, "
                               "lighting and that the board's white border is in view)")

    picked = select_diverse([_pose_feature(v, pattern, size) for v in views], int(max_frames))
    views = [views[i] for i in picked]
    obj = board_points(pattern, square_size)
    flags = cv2.CALIB_FIX_K3 if fix_k3 else 0
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 100, 1e-9)

    def solve(vs):
        return cv2.calibrateCamera([obj] * len(vs), [v.reshape(-1, 1, 2) for v in vs], size, None, None,
                                   flags=flags, criteria=criteria)

    try:
        rms, k, dist, rvecs, tvecs = solve(views)
        # one pass of outlier rejection: views far worse than the rest (a mis-ordered or blurred detection)
        errs = np.array([_view_rms(cv2, obj, v, r, t, k, dist) for v, r, t in zip(views, rvecs, tvecs)])
        bad = errs > max(1.0, 3.0 * float(np.median(errs)))
        if bad.any() and (~bad).sum() >= MIN_VIEWS:
            views = [v for v, b in zip(views, bad) if not b]
            rms, k, dist, rvecs, tvecs = solve(views)
    except cv2.error as exc:
        raise CalibrationError(f"OpenCV calibration failed: {str(exc).strip().splitlines()[-1]}") from None
    k = np.asarray(k, np.float64)
    dist = np.asarray(dist, np.float64).reshape(-1)
    dist = [float(v) for v in np.concatenate([dist, np.zeros(5)])[:5]]
    if not (np.isfinite(k).all() and k[0, 0] > 0 and k[1, 1] > 0 and math.isfinite(rms)):
        raise CalibrationError("OpenCV calibration gave no usable intrinsics; show the board at more varied tilts")
    return CameraCalibration(name, size[0], size[1], float(k[0, 0]), float(k[1, 1]), float(k[0, 2]),
                             float(k[1, 2]), dist, "checkerboard", float(rms), len(views))


def _view_rms(cv2, obj, corners, rvec, tvec, k, dist) -> float:
    proj, _ = cv2.projectPoints(obj, rvec, tvec, k, dist)
    return float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - corners) ** 2, axis=1))))
