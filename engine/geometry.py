"""Camera and rotation conventions shared by the fitter, the tracker and the outputs.

Frames:
* model frame (ICT-FaceKit): +x the subject's left, +y up, +z out of the face, centimetres;
* camera frame (OpenCV): +x image right, +y image down, +z away from the camera.
A head facing the camera has model rotation R = I; its camera rotation is FLIP @ R.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLIP = np.diag([1.0, -1.0, -1.0])  # model frame -> camera frame for a frontal head
DEFAULT_HFOV_DEG = 60.0  # horizontal field of view assumed when the camera is unknown (typical webcam)


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels (no distortion)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_fov(cls, width: int, height: int, hfov_deg: float = DEFAULT_HFOV_DEG) -> "Camera":
        if not 1.0 < hfov_deg < 179.0:
            raise ValueError(f"horizontal field of view must be in (1, 179) degrees, got {hfov_deg}")
        f = 0.5 * width / math.tan(math.radians(hfov_deg) / 2.0)
        return cls(f, f, width / 2.0, height / 2.0, width, height)

    def project(self, points_cam: np.ndarray) -> np.ndarray:
        """(..., 3) camera-frame points -> (..., 2) pixels."""
        z = points_cam[..., 2:3]
        uv = points_cam[..., :2] / z
        return uv * np.array([self.fx, self.fy]) + np.array([self.cx, self.cy])

    @staticmethod
    def project_each(cameras: list["Camera"], points_cam: np.ndarray) -> np.ndarray:
        """Points (B, ..., 3) of B faces, face b through cameras[b] -> (B, ..., 2) pixels (batched `project`)."""
        shape = (len(cameras),) + (1,) * (points_cam.ndim - 2) + (2,)
        f = np.array([[c.fx, c.fy] for c in cameras]).reshape(shape)
        c0 = np.array([[c.cx, c.cy] for c in cameras]).reshape(shape)
        return points_cam[..., :2] / points_cam[..., 2:3] * f + c0


def skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def rodrigues(w: np.ndarray) -> np.ndarray:
    """Axis-angle vector -> rotation matrix."""
    theta = float(np.linalg.norm(w))
    if theta < 1e-12:
        return np.eye(3) + skew(w)
    k = skew(w / theta)
    return np.eye(3) + math.sin(theta) * k + (1.0 - math.cos(theta)) * (k @ k)


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def euler_to_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Head rotation in the model frame from (yaw, pitch, roll) degrees.

    yaw > 0 turns the face toward the subject's left, pitch > 0 looks up, roll > 0 tilts the head
    toward the subject's left shoulder. R = Ry(yaw) Rx(-pitch) Rz(-roll).
    """
    return _ry(math.radians(yaw_deg)) @ _rx(-math.radians(pitch_deg)) @ _rz(-math.radians(roll_deg))


def matrix_to_euler(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of euler_to_matrix: (yaw, pitch, roll) in degrees."""
    # R = Ry(a) Rx(b) Rz(c) with a = yaw, b = -pitch, c = -roll.
    b = math.asin(float(np.clip(-r[1, 2], -1.0, 1.0)))
    a = math.atan2(r[0, 2], r[2, 2])
    c = math.atan2(r[1, 0], r[1, 1])
    return math.degrees(a), -math.degrees(b), -math.degrees(c)


def matrix_to_quat(r: np.ndarray) -> tuple[float, float, float, float]:
    """Rotation matrix -> unit quaternion (x, y, z, w) with w >= 0."""
    m = r
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        w, x, y, z = 0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        w, x, y, z = (m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        w, x, y, z = (m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        w, x, y, z = (m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s
    q = np.array([x, y, z, w])
    q /= np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    return tuple(float(v) for v in q)


def rotation_from_6d(v: np.ndarray) -> np.ndarray:
    """Two 3-vectors (first two columns, unnormalised) -> rotation matrix (Gram-Schmidt)."""
    a, b = v[..., :3], v[..., 3:6]
    c1 = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - (c1 * b).sum(-1, keepdims=True) * c1
    c2 = b / np.linalg.norm(b, axis=-1, keepdims=True)
    c3 = np.cross(c1, c2)
    return np.stack([c1, c2, c3], axis=-1)
