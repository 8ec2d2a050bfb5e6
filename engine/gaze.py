"""Gaze from the iris centres, and the ICT/ARKit eyeLook* values it implies."""
from __future__ import annotations

import math

import numpy as np

# MediaPipe mesh indices, subject's own sides. Axis points go toward image +x (the subject's left).
EYES = {
    "right": {"axis": (33, 133), "lids": (159, 145), "iris": 468},
    "left": {"axis": (362, 263), "lids": (386, 374), "iris": 473},
}
FULL_LOOK_DEG = 30.0  # eyeLook* reaches 1.0 at this gaze angle

# ICT expression indices of the eyeLook shapes (see the npz exp_names)
ICT_EYE_LOOK = {
    ("down", "left"): 12, ("down", "right"): 13, ("in", "left"): 14, ("in", "right"): 15,
    ("out", "left"): 16, ("out", "right"): 17, ("up", "left"): 18, ("up", "right"): 19,
}


class GazeEstimator:
    """Gaze per eye from the observed iris centre and the fitted head.

    The iris centre of the face model is turned about its eyeball centre (yaw, then pitch, from the
    model's rest gaze; the result is reported from straight ahead) until its projection lands on the observed iris centre: a 2-parameter
    Gauss-Newton per eye, so head pose and perspective are accounted for. As the lids close the iris
    is hidden and its landmark meaningless, so the estimate fades to zero with the lid opening.
    """

    def __init__(self, model):
        self.model = model
        lm = model.lm_neutral
        self.open0 = {side: _opening(lm[:, :2], ids) for side, ids in EYES.items()}
        # ICT's eyes rest slightly outward; report gaze relative to straight ahead (the head's +z)
        ax = model.eye_axes.astype(np.float64)
        self.rest_deg = {side: (math.degrees(math.atan2(ax[k, 0], ax[k, 2])), math.degrees(math.asin(ax[k, 1])))
                         for k, side in enumerate(("left", "right"))}

    def __call__(self, landmarks_px: np.ndarray, camera, rotation_cam: np.ndarray, translation: np.ndarray,
                 identity: np.ndarray, expression: np.ndarray) -> dict[str, tuple[float, float]]:
        """-> {"left": (yaw, pitch), "right": (yaw, pitch)} degrees; yaw > 0 toward the subject's left, pitch > 0 up."""
        lm_model = self.model.landmarks(identity, expression)
        centres = self.model.eye_centres_for(identity)
        sides = ("left", "right")
        centre = np.stack([centres[k] for k in range(2)]).astype(np.float64)  # (eye, 3)
        offset = np.stack([lm_model[EYES[s]["iris"]] for s in sides]).astype(np.float64) - centre
        target = np.stack([landmarks_px[EYES[s]["iris"], :2] for s in sides]).astype(np.float64)
        fc = np.array([camera.fx, camera.fy]), np.array([camera.cx, camera.cy])

        def project(ang):
            """Iris centres (eye, k, 2) px for yaw/pitch angles (eye, k, 2) in radians: the face model's eyeball
            rotation (yaw about +y, then pitch up), then the head pose and the camera."""
            cy, sy = np.cos(ang[..., 0]), np.sin(ang[..., 0])
            cp, sp = np.cos(-ang[..., 1]), np.sin(-ang[..., 1])
            d = offset[:, None, :]
            dy = cp * d[..., 1] - sp * d[..., 2]
            dz = sp * d[..., 1] + cp * d[..., 2]
            q = centre[:, None, :] + np.stack([cy * d[..., 0] + sy * dz, dy, -sy * d[..., 0] + cy * dz], -1)
            pc = q @ rotation_cam.T + translation
            return fc[0] * pc[..., :2] / pc[..., 2:] + fc[1]

        # 2-parameter Gauss-Newton per eye, both eyes at once; central differences (5 evaluations per step)
        steps = np.array([[0.0, 0.0], [1e-3, 0.0], [-1e-3, 0.0], [0.0, 1e-3], [0.0, -1e-3]])
        ang = np.zeros((2, 2))
        for _ in range(4):
            p = project(ang[:, None, :] + steps)
            r = p[:, 0] - target
            jac = np.stack([p[:, 1] - p[:, 2], p[:, 3] - p[:, 4]], -1) / 2e-3  # (eye, coordinate, angle)
            ang = np.clip(ang - np.stack([np.linalg.lstsq(jac[k], r[k], rcond=None)[0] for k in range(2)]),
                          -0.8, 0.8)
        out = {}
        for k, side in enumerate(sides):
            ratio = _opening(landmarks_px[:, :2], EYES[side]) / max(self.open0[side], 1e-6)
            visible = float(np.clip((ratio - 0.25) / 0.35, 0.0, 1.0))
            rest_yaw, rest_pitch = self.rest_deg[side]
            out[side] = ((math.degrees(ang[k, 0]) + rest_yaw) * visible,
                         (math.degrees(ang[k, 1]) + rest_pitch) * visible)
        return out


def _opening(points: np.ndarray, ids: dict) -> float:
    """Lid distance over eye width (corner to corner)."""
    width = np.linalg.norm(points[ids["axis"][1]] - points[ids["axis"][0]])
    return float(np.linalg.norm(points[ids["lids"][0]] - points[ids["lids"][1]]) / max(width, 1e-6))


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
