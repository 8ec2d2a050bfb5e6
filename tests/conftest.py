"""Shared fixtures. Tests read real data from FACESTREAM_ASSETS (CI: ../shared/assets)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def assets_root() -> Path:
    env = os.environ.get("FACESTREAM_ASSETS")
    if not env:
        pytest.skip("FACESTREAM_ASSETS is not set (CI sets it to ../shared/assets)")
    return Path(env)


def media_path(name: str) -> Path:
    p = assets_root() / "media" / name
    if not p.is_file():
        pytest.skip(f"shared media file {p} is missing")
    return p


@pytest.fixture(scope="session")
def pack():
    from engine.assets import AssetMissingError
    from engine.pack import Pack

    try:
        return Pack()
    except AssetMissingError as exc:
        pytest.skip(f"{exc}")


@pytest.fixture(scope="session")
def model():
    """The ICT-FaceKit face model with its derived topology (skips when the assets are missing)."""
    from engine.assets import AssetMissingError
    from engine.face_model import FaceModel

    try:
        return FaceModel.load()
    except AssetMissingError as exc:
        pytest.skip(f"{exc}")


@pytest.fixture(scope="session")
def refiner(model):
    """The PRDL refiner the refinement tests share (default config, eye-look shapes held, as the tracker's)."""
    from engine.gaze import eye_look_mask
    from engine.refine import PrdlRefiner

    return PrdlRefiner(model, fixed_exp=eye_look_mask(model.n_exp))


@pytest.fixture(scope="session")
def batch_problems(refiner):
    """Six synthetic refinement problems, half of them with a previous frame (temporal term)."""
    from engine.refine import synthetic_problems

    probs = synthetic_problems(refiner, 6, seed=3)
    for i, p in enumerate(probs):
        if i % 2:
            p.exp_prev = np.clip(p.expression + 0.05, 0.0, 1.0)
    return probs
