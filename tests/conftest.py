"""Shared fixtures. Tests read real data from FACESTREAM_ASSETS (CI: ../shared/assets)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

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
