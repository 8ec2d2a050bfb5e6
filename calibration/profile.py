"""A user's calibration profile: camera, identity, resting face and expression ranges, as versioned JSON.

The tracker takes a profile through three duck-typed hooks (`identity`, `camera_for`, `apply`), so the
engine imports nothing from here. A corrupt or foreign file raises `ProfileError` with a message that says
what is wrong; callers report it and carry on uncalibrated.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.arkit import ARKIT_NAMES
from engine.geometry import Camera, euler_to_matrix, matrix_to_euler, matrix_to_quat

FORMAT = "facestream-profile"
VERSION = 1
N_IDENTITY = 100
MIN_SPAN = 0.05  # a blendshape's calibrated range never shrinks below this (keeps noise from exploding)


class ProfileError(ValueError):
    """The file is not a usable facestream profile; the message says why."""


@dataclass
class Neutral:
    """Blendshapes and head pose of the user's resting face."""

    blendshapes: dict[str, float]
    head_euler_deg: tuple[float, float, float]
    frames: int


@dataclass
class Ranges:
    """Per blendshape, the value the user's full expression reaches; `gamma` < 1 lifts small motions."""

    maximum: dict[str, float]
    gamma: float = 0.8
    frames: int = 0


@dataclass
class Identity:
    coefficients: list[float]
    frames: int
    spread: float  # RMS of per-frame estimates around the result, landmark cm


@dataclass
class Profile:
    name: str = "default"
    camera: dict | None = None  # calibration.camera.CameraCalibration.to_dict()
    identity: Identity | None = None
    neutral: Neutral | None = None
    ranges: Ranges | None = None
    relative_head_pose: bool = False
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    # ---------------------------------------------------------------- tracker hooks
    @property
    def identity_coefficients(self) -> np.ndarray | None:
        return None if self.identity is None else np.asarray(self.identity.coefficients, np.float64)

    def camera_for(self, width: int, height: int) -> Camera | None:
        if self.camera is None:
            return None
        from calibration.camera import CameraCalibration

        cal = CameraCalibration.from_dict(self.camera)
        if (cal.width, cal.height) != (width, height):
            try:
                cal = cal.scaled_to(width, height)
            except ValueError:
                return None  # another aspect ratio: not this camera's mode, use the default FOV
        return cal.to_camera()

    def apply(self, state) -> None:
        """Remap a tracked FaceState in place: resting face -> 0, the user's full expression -> 1, and
        (if asked) head pose relative to the resting pose."""
        if not state.face:
            return
        bs = np.asarray(state.blendshapes, np.float64).copy()
        rest = np.zeros(len(ARKIT_NAMES))
        top = np.ones(len(ARKIT_NAMES))
        gamma = 1.0
        if self.neutral is not None:
            rest = np.array([self.neutral.blendshapes.get(n, 0.0) for n in ARKIT_NAMES])
        if self.ranges is not None:
            top = np.array([self.ranges.maximum.get(n, 1.0) for n in ARKIT_NAMES])
            gamma = self.ranges.gamma
        span = np.maximum(top - rest, MIN_SPAN)
        state.blendshapes = np.clip((bs - rest) / span, 0.0, 1.0) ** gamma
        if self.relative_head_pose and self.neutral is not None:
            rest_r = euler_to_matrix(*self.neutral.head_euler_deg)
            rel = rest_r.T @ state.rotation
            state.rotation = rel
            state.euler_deg = matrix_to_euler(rel)
            state.quat = matrix_to_quat(rel)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "created": self.created,
            "relative_head_pose": self.relative_head_pose,
            "camera": self.camera,
            "identity": None if self.identity is None else {
                "coefficients": [float(c) for c in self.identity.coefficients], "frames": self.identity.frames,
                "spread_cm": self.identity.spread},
            "neutral": None if self.neutral is None else {
                "blendshapes": dict(self.neutral.blendshapes), "head_euler_deg": list(self.neutral.head_euler_deg),
                "frames": self.neutral.frames},
            "ranges": None if self.ranges is None else {
                "maximum": dict(self.ranges.maximum), "gamma": self.ranges.gamma, "frames": self.ranges.frames},
        }

    @classmethod
    def from_dict(cls, d) -> "Profile":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ProfileError(f"not a facestream profile (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ProfileError(f"profile version {d.get('version')!r} is not supported (this build reads {VERSION})")
        try:
            p = cls(name=str(d.get("name", "default")), relative_head_pose=bool(d.get("relative_head_pose", False)),
                    created=str(d.get("created", "")))
            if d.get("camera") is not None:
                from calibration.camera import CameraCalibration

                CameraCalibration.from_dict(d["camera"])  # validates
                p.camera = dict(d["camera"])
            if d.get("identity") is not None:
                c = [float(v) for v in d["identity"]["coefficients"]]
                if len(c) != N_IDENTITY or not all(math.isfinite(v) for v in c):
                    raise ProfileError(f"identity needs {N_IDENTITY} finite coefficients, got {len(c)}")
                p.identity = Identity(c, int(d["identity"]["frames"]), float(d["identity"]["spread_cm"]))
            if d.get("neutral") is not None:
                p.neutral = Neutral(_blendshape_map(d["neutral"]["blendshapes"], "neutral"),
                                    tuple(float(v) for v in d["neutral"]["head_euler_deg"]),
                                    int(d["neutral"]["frames"]))
                if len(p.neutral.head_euler_deg) != 3:
                    raise ProfileError("neutral head_euler_deg needs 3 angles")
            if d.get("ranges") is not None:
                gamma = float(d["ranges"].get("gamma", 0.8))
                if not 0.2 <= gamma <= 2.0:
                    raise ProfileError(f"ranges gamma {gamma} is outside 0.2..2")
                p.ranges = Ranges(_blendshape_map(d["ranges"]["maximum"], "ranges"), gamma,
                                  int(d["ranges"].get("frames", 0)))
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile: {type(exc).__name__}: {exc}") from None
        return p

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        try:
            return cls.from_dict(data)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None

    @classmethod
    def load_or_new(cls, path: str | Path) -> "Profile":
        """The profile at `path` if it exists (errors if it is corrupt), else a new empty one."""
        return cls.load(path) if Path(path).exists() else cls(name=Path(path).stem)


def _blendshape_map(m, what: str) -> dict[str, float]:
    if not isinstance(m, dict):
        raise ProfileError(f"{what} blendshapes must be an object of name -> value")
    out = {}
    for k, v in m.items():
        if k not in ARKIT_NAMES:
            raise ProfileError(f"{what}: unknown blendshape name {k!r}")
        v = float(v)
        if not (0.0 <= v <= 1.0):
            raise ProfileError(f"{what}: {k} = {v} is outside 0..1")
        out[k] = v
    return out
