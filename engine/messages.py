"""The one place that turns a tracked frame into a schema-v1 coefficient message."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.arkit import ARKIT_NAMES

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "coefficients.v1.schema.json"


@dataclass
class FaceState:
    """What the tracker knows about one frame. Arrays are float64 numpy; pose in camera coordinates."""

    frame: int
    pts: float | None
    ts_capture: float  # ms since the Unix epoch
    face: bool = False
    score: float = 0.0
    expression: np.ndarray | None = None  # (53,) ICT weights in [0, 1]
    blendshapes: np.ndarray | None = None  # (52,) ARKit order
    rotation: np.ndarray | None = None  # (3, 3) head rotation in the face model frame
    euler_deg: tuple[float, float, float] | None = None  # yaw, pitch, roll
    quat: tuple[float, float, float, float] | None = None  # x, y, z, w
    translation_cm: np.ndarray | None = None  # (3,) head origin in camera coordinates
    gaze_deg: dict | None = None  # {"left": (yaw, pitch), "right": (yaw, pitch)}
    landmarks: np.ndarray | None = None  # (478, 3) network landmarks, image pixels
    landmarks68: np.ndarray | None = None  # (68, 2) fitted mesh points, image pixels
    identity: np.ndarray | None = None  # (100,) identity coefficients in use
    timings_ms: dict[str, float] = field(default_factory=dict)
    time_base: str | None = None
    prdl: dict | None = None  # refinement report: loss_before, loss_after, iterations, masks


def build_message(state: FaceState, session: str, model_name: str = "ict-facekit",
                  include_landmarks68: bool = False) -> dict:
    msg: dict = {
        "v": SCHEMA_VERSION,
        "session": session,
        "frame": int(state.frame),
        "pts": None if state.pts is None else float(state.pts),
        "ts_capture": round(float(state.ts_capture), 3),
        "ts_sent": round(time.time() * 1000.0, 3),
        "face": bool(state.face),
        "score": round(float(np.clip(state.score, 0.0, 1.0)), 4),
        "timing_ms": {k: round(float(max(v, 0.0)), 3) for k, v in state.timings_ms.items()},
    }
    if state.time_base is not None:
        msg["time_base"] = state.time_base
    if not state.face:
        return msg
    bs = np.clip(state.blendshapes, 0.0, 1.0)
    msg["blendshapes"] = {name: round(float(v), 4) for name, v in zip(ARKIT_NAMES, bs)}
    yaw, pitch, roll = state.euler_deg
    msg["head"] = {
        "euler_deg": {"yaw": round(yaw, 3), "pitch": round(pitch, 3), "roll": round(roll, 3)},
        "quat": [round(float(q), 6) for q in state.quat],
        "translation_m": [round(float(t) / 100.0, 5) for t in state.translation_cm],
    }
    gl, gr = state.gaze_deg["left"], state.gaze_deg["right"]
    msg["eyes"] = {"left": {"yaw": round(gl[0], 2), "pitch": round(gl[1], 2)},
                   "right": {"yaw": round(gr[0], 2), "pitch": round(gr[1], 2)}}
    msg["model"] = {"name": model_name, "expression": [round(float(e), 4) for e in state.expression]}
    if state.prdl is not None:
        msg["prdl"] = state.prdl
    if include_landmarks68 and state.landmarks68 is not None:
        msg["landmarks68"] = [[round(float(x), 2), round(float(y), 2)] for x, y in state.landmarks68]
    return msg


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_message(msg: dict) -> None:
    """Raise jsonschema.ValidationError if msg is not a valid schema-v1 message."""
    _validator().validate(msg)
