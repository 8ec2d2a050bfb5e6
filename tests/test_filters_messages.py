"""One-Euro filter behaviour and the message builder against the shipped schema."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from engine.arkit import ARKIT_NAMES
from engine.filters import OneEuroFilter
from engine.messages import SCHEMA_PATH, FaceState, build_message, validate_message


def test_one_euro_smooths_jitter_on_a_still_signal():
    rng = np.random.default_rng(1)
    f = OneEuroFilter(min_cutoff=1.0, beta=0.05)
    raw = 10 + rng.normal(0, 0.5, 300)
    out = np.array([f(np.array([v]), i / 30.0)[0] for i, v in enumerate(raw)])
    assert out[30:].std() < 0.4 * raw[30:].std()


def test_one_euro_follows_fast_motion_with_little_lag():
    f = OneEuroFilter(min_cutoff=1.0, beta=0.05)
    t = np.arange(60) / 30.0
    step = np.where(t < 1.0, 0.0, 40.0)  # a 40-degree head turn in one frame
    out = np.array([f(np.array([v]), ti)[0] for v, ti in zip(step, t)])
    assert out[33] > 0.9 * 40.0  # within 3 frames of the step


def test_face_message_validates_and_has_all_52_blendshapes():
    s = FaceState(frame=3, pts=0.1, ts_capture=1.0, face=True, score=0.99, expression=np.full(53, 0.2),
                  blendshapes=np.linspace(0, 1, 52), rotation=np.eye(3), euler_deg=(1.0, 2.0, 3.0),
                  quat=(0.0, 0.0, 0.0, 1.0), translation_cm=np.array([1.0, 2.0, 50.0]),
                  gaze_deg={"left": (1.0, 2.0), "right": (3.0, 4.0)}, landmarks68=np.zeros((68, 2)),
                  timings_ms={"landmarks": 3.0})
    msg = build_message(s, "sess", include_landmarks68=True)
    validate_message(msg)
    assert list(msg["blendshapes"]) == list(ARKIT_NAMES)
    assert msg["head"]["translation_m"] == [0.01, 0.02, 0.5]


def test_schema_rejects_a_face_message_without_blendshapes():
    s = FaceState(frame=0, pts=None, ts_capture=0.0)
    msg = build_message(s, "sess")
    validate_message(msg)  # face: false needs no coefficients
    msg["face"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate_message(msg)


def test_schema_file_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))
