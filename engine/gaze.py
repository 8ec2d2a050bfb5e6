"""Gaze from the iris centre inside the eye opening, and the ARKit eyeLook* values it implies.

The iris offset from the middle of the eye, measured along the eye axis (corner to corner) in units of
the eye width, is turned into an eyeball rotation: offset * eye_width / eyeball_radius = sin(angle).
"""
from __future__ import annotations

import math

import numpy as np

# MediaPipe mesh indices, subject's own sides. Axis points go toward image +x (the subject's left).
EYES = {
    "right": {"axis": (33, 133), "lids": (159, 145), "iris": 468},
    "left": {"axis": (362, 263), "lids": (386, 374), "iris": 473},
}
EYE_WIDTH_CM = 3.0  # corner to corner, adult average
EYEBALL_RADIUS_CM = 1.2
FULL_LOOK_DEG = 30.0  # eyeLook* reaches 1.0 at this gaze angle

# ICT expression indices of the eyeLook shapes (see the npz exp_names)
ICT_EYE_LOOK = {
    ("down", "left"): 12, ("down", "right"): 13, ("in", "left"): 14, ("in", "right"): 15,
    ("out", "left"): 16, ("out", "right"): 17, ("up", "left"): 18, ("up", "right"): 19,
}


def eye_offsets(points: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per eye: iris offset from the corner midpoint along / across the eye axis in eye widths, and the
    lid opening in eye widths. Corners, not lids, are the reference: lids move with blinks."""
    out = {}
    for side, ids in EYES.items():
        a, b = points[ids["axis"][0], :2], points[ids["axis"][1], :2]
        up, low = points[ids["lids"][0], :2], points[ids["lids"][1], :2]
        axis = b - a
        width = float(np.linalg.norm(axis))
        if width < 1e-6:
            out[side] = (0.0, 0.0, 0.0)
            continue
        ex = axis / width
        ey = np.array([ex[1], -ex[0]])  # perpendicular, pointing up on screen
        d = points[ids["iris"], :2] - 0.5 * (a + b)
        out[side] = (float(d @ ex) / width, float(d @ ey) / width, float(np.linalg.norm(up - low)) / width)
    return out


class GazeEstimator:
    """Gaze in degrees relative to the head. The offsets of the face model's own neutral landmarks are
    the zero (its eyes rest slightly outward), and gaze fades out as the lids close (the iris is hidden)."""

    def __init__(self, neutral_landmarks: np.ndarray):
        front = neutral_landmarks[:, :2] * np.array([1.0, -1.0])  # model frame seen from the front, y down
        self.zero = eye_offsets(front)

    def __call__(self, points: np.ndarray) -> dict[str, tuple[float, float]]:
        """(478, >=2) image pixels -> {"left": (yaw, pitch), "right": (yaw, pitch)}; yaw > 0 toward the
        subject's left (image right for an unmirrored camera), pitch > 0 up."""
        k = EYE_WIDTH_CM / EYEBALL_RADIUS_CM
        out = {}
        for side, (h, v, opening) in eye_offsets(points).items():
            h0, v0, open0 = self.zero[side]
            visible = float(np.clip((opening / max(open0, 1e-6) - 0.25) / 0.35, 0.0, 1.0))
            yaw = math.degrees(math.asin(max(-1.0, min(1.0, (h - h0) * k)))) * visible
            pitch = math.degrees(math.asin(max(-1.0, min(1.0, (v - v0) * k)))) * visible
            out[side] = (yaw, pitch)
        return out


def eye_look_expression(gaze: dict[str, tuple[float, float]]) -> dict[int, float]:
    """ICT eyeLook* weights from gaze. For the left eye 'in' (toward the nose) is yaw < 0."""
    vals = {}
    for side in ("left", "right"):
        yaw, pitch = gaze[side]
        toward_left = max(yaw, 0.0) / FULL_LOOK_DEG
        toward_right = max(-yaw, 0.0) / FULL_LOOK_DEG
        vals[ICT_EYE_LOOK[("out", side)]] = toward_left if side == "left" else toward_right
        vals[ICT_EYE_LOOK[("in", side)]] = toward_right if side == "left" else toward_left
        vals[ICT_EYE_LOOK[("up", side)]] = max(pitch, 0.0) / FULL_LOOK_DEG
        vals[ICT_EYE_LOOK[("down", side)]] = max(-pitch, 0.0) / FULL_LOOK_DEG
    return {k: float(min(v, 1.0)) for k, v in vals.items()}
