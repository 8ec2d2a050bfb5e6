"""Gaze from the iris centres, and the ICT/ARKit eyeLook* values it implies."""
from __future__ import annotations

import math

import numpy as np

from engine.geometry import Camera

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


def eye_look_mask(n_exp: int) -> np.ndarray:
    """(n_exp,) bool: the eyeLook shapes, which gaze sets and the landmark fit and PRDL hold fixed."""
    fixed = np.zeros(n_exp, bool)
    fixed[list(ICT_EYE_LOOK.values())] = True
    return fixed


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
        return self.batch(landmarks_px[None], [camera], rotation_cam[None], np.asarray(translation)[None],
                          np.asarray(identity)[None], np.asarray(expression)[None])[0]

    def batch(self, landmarks_px: np.ndarray, cameras: list, rotation_cam: np.ndarray, translation: np.ndarray,
              identity: np.ndarray, expression: np.ndarray) -> list[dict[str, tuple[float, float]]]:
        """Gaze of many faces at once (landmarks (B, 478, >=2) px, rotation (B, 3, 3), translation (B, 3),
        identity (B, n_id), expression (B, n_exp)): one vectorised fit for all eyes, so a batch of tracked
        faces (`Regressor.regress_batch`) does not pay a per-face NumPy fit."""
        sides = ("left", "right")
        iris = [EYES[s]["iris"] for s in sides]
        lm_model = self.model.landmarks(identity, expression)[:, iris]  # (B, eye, 3)
        centre = np.asarray(self.model.eye_centres_for(identity), np.float64)  # (B, eye, 3)
        offset = lm_model.astype(np.float64) - centre
        lm = np.asarray(landmarks_px, np.float64)
        target = lm[:, iris, :2]  # (B, eye, 2)
        rc, t = np.asarray(rotation_cam, np.float64), np.asarray(translation, np.float64)

        def project(ang):
            """Iris centres (B, eye, k, 2) px for yaw/pitch angles (B, eye, k, 2) in radians: the face model's
            eyeball rotation (yaw about +y, then pitch up), then the head pose and the camera."""
            cy, sy = np.cos(ang[..., 0]), np.sin(ang[..., 0])
            cp, sp = np.cos(-ang[..., 1]), np.sin(-ang[..., 1])
            d = offset[:, :, None, :]
            dy = cp * d[..., 1] - sp * d[..., 2]
            dz = sp * d[..., 1] + cp * d[..., 2]
            q = centre[:, :, None, :] + np.stack([cy * d[..., 0] + sy * dz, dy, -sy * d[..., 0] + cy * dz], -1)
            return Camera.project_each(cameras, np.einsum("bekj,bij->beki", q, rc) + t[:, None, None, :])

        # 2-parameter Gauss-Newton per eye, all eyes at once; central differences (5 evaluations per step)
        steps = np.array([[0.0, 0.0], [1e-3, 0.0], [-1e-3, 0.0], [0.0, 1e-3], [0.0, -1e-3]])
        ang = np.zeros(target.shape)
        for _ in range(4):
            p = project(ang[:, :, None, :] + steps)
            r = p[:, :, 0] - target
            jac = np.stack([p[:, :, 1] - p[:, :, 2], p[:, :, 3] - p[:, :, 4]], -1) / 2e-3  # (B, eye, coord, angle)
            # least squares (minimum norm where the 2x2 system is singular, as lstsq)
            ang = np.clip(ang - (np.linalg.pinv(jac) @ r[..., None])[..., 0], -0.8, 0.8)
        out = []
        for b in range(len(lm)):
            g = {}
            for k, side in enumerate(sides):
                ratio = _opening(lm[b, :, :2], EYES[side]) / max(self.open0[side], 1e-6)
                visible = float(np.clip((ratio - 0.25) / 0.35, 0.0, 1.0))
                rest_yaw, rest_pitch = self.rest_deg[side]
                g[side] = ((math.degrees(ang[b, k, 0]) + rest_yaw) * visible,
                           (math.degrees(ang[b, k, 1]) + rest_pitch) * visible)
            out.append(g)
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
