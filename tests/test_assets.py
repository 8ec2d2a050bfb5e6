"""Asset resolution order and the clear error when something is missing."""
from __future__ import annotations

import zipfile

import pytest

from engine import assets


def test_env_folder_wins_over_cache(tmp_path, monkeypatch):
    env, cache = tmp_path / "env", tmp_path / "cache"
    for root in (env, cache / "facestream"):
        (root / "x").mkdir(parents=True)
        (root / "x" / "f.bin").write_text(str(root))
    monkeypatch.setenv("FACESTREAM_ASSETS", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert assets.find_asset("x/f.bin") == env / "x" / "f.bin"
    (env / "x" / "f.bin").unlink()
    assert assets.find_asset("x/f.bin") == cache / "facestream" / "x" / "f.bin"


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FACESTREAM_ASSETS", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    with pytest.raises(assets.AssetMissingError, match="facestream assets fetch"):
        assets.find_asset("ict_facekit/ict_face_model.npz")


def test_contours_are_read_as_literals_in_file_order():
    src = "X = 1\nFACEMESH_LIPS = frozenset([(61, 146), (146, 91)])\nFACEMESH_FACE_OVAL = frozenset([(10, 338)])\n"
    assert assets.parse_contours(src) == {"lips": [[61, 146], [146, 91]], "face_oval": [[10, 338]]}


def test_mediapipe_models_are_extracted_from_a_wheel(tmp_path):
    wheel = tmp_path / "mediapipe-0.10.14-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member in assets.MEDIAPIPE_MODELS:
            zf.writestr(member, member.encode())
    written = assets.fetch_mediapipe_models(tmp_path / "dest", wheel=wheel)
    assert len(written) == 4
    for member, rel in assets.MEDIAPIPE_MODELS.items():
        assert (tmp_path / "dest" / rel).read_bytes() == member.encode()
