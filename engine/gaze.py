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


def estimate_gaze(points: np.ndarray) -> dict[str, tuple[float, float]]:
    """(478, >=2) image pixels -> {"left": (yaw, pitch), "right": (yaw, pitch)} degrees.

    yaw > 0 toward the subject's left (image right for an unmirrored camera), pitch > 0 up.
    """
    out = {}
    for side, ids in EYES.items():
        a, b = points[ids["axis"][0], :2], points[ids["axis"][1], :2]
        up, low = points[ids["lids"][0], :2], points[ids["lids"][1], :2]
        iris = points[ids["iris"], :2]
        axis = b - a
        width = float(np.linalg.norm(axis))
        if width < 1e-6:
            out[side] = (0.0, 0.0)
            continue
        ex = axis / width
        ey = np.array([ex[1], -ex[0]])  # perpendicular, pointing up on screen
        centre = 0.5 * (a + b) * 0.5 + 0.5 * (up + low) * 0.5
        d = iris - centre
        h = float(d @ ex) / width
        v = float(d @ ey) / width
        k = EYE_WIDTH_CM / EYEBALL_RADIUS_CM
        yaw = math.degrees(math.asin(max(-1.0, min(1.0, h * k))))
        pitch = math.degrees(math.asin(max(-1.0, min(1.0, v * k))))
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
