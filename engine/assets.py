"""Where the engine finds its data files, and how a user gets them.

Search order (DESIGN.md): the folder named by ``FACESTREAM_ASSETS``, then the user cache
(``$XDG_CACHE_HOME/facestream`` or ``~/.cache/facestream``). Nothing is downloaded at run time;
``facestream assets fetch`` is the one command that downloads, and only when a user runs it.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

FETCH_HINT = "run `facestream assets fetch` (needs internet) or point FACESTREAM_ASSETS at a folder that has it"

MEDIAPIPE_WHEEL = "mediapipe==0.10.14"
# Network files inside the wheel -> where they live under an assets root.
MEDIAPIPE_MODELS = {
    "mediapipe/modules/face_detection/face_detection_short_range.tflite": "mediapipe_models/face_detection_short_range.tflite",
    "mediapipe/modules/face_landmark/face_landmark.tflite": "mediapipe_models/face_landmark.tflite",
    "mediapipe/modules/face_landmark/face_landmark_with_attention.tflite": "mediapipe_models/face_landmark_with_attention.tflite",
    "mediapipe/modules/iris_landmark/iris_landmark.tflite": "mediapipe_models/iris_landmark.tflite",
}

ICT_REPO_ZIP = "https://github.com/ICT-VGL/ICT-FaceKit/archive/da5f95a607f5e6b37755b38d3385d7f2853732e5.zip"
MEDIAPIPE_GEOMETRY_BASE = (
    "https://raw.githubusercontent.com/google-ai-edge/mediapipe/v0.10.14/mediapipe/modules/face_geometry/data/"
)


class AssetMissingError(FileNotFoundError):
    """An asset is in none of the search roots; the message says how to get it."""


@dataclass(frozen=True)
class AssetSpec:
    relpath: str
    what: str
    required: bool  # needed by the default `track` path


ASSETS: tuple[AssetSpec, ...] = (
    AssetSpec("ict_facekit/ict_face_model.npz", "ICT-FaceKit face model (npz)", True),
    AssetSpec("mediapipe/canonical_face_model.obj", "MediaPipe canonical face mesh", True),
    AssetSpec("mediapipe/face_model_with_iris.obj", "MediaPipe canonical face mesh with irises", True),
    AssetSpec("mediapipe/face_mesh_contours.json", "MediaPipe face mesh contours", True),
    *(AssetSpec(rel, f"MediaPipe network {Path(rel).name}", True) for rel in MEDIAPIPE_MODELS.values()),
    AssetSpec("faceparse/bisenetv2_celebamaskhq_448x448_integer_quant.tflite", "BiSeNetV2 face parser (optional)", False),
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facestream"


def search_roots() -> list[Path]:
    roots = []
    env = os.environ.get("FACESTREAM_ASSETS")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(cache_dir())
    return roots


def find_asset(relpath: str) -> Path:
    """Absolute path of an asset, or AssetMissingError naming the roots searched and the fix."""
    for root in search_roots():
        candidate = root / relpath
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(r) for r in search_roots())
    raise AssetMissingError(f"asset '{relpath}' not found (searched: {tried}); {FETCH_HINT}")


def derived_cache(name: str) -> Path:
    """A writable file path for data the engine computes once from the assets (part labels, ...)."""
    path = cache_dir() / "derived" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def check() -> list[tuple[AssetSpec, Path | None]]:
    out = []
    for spec in ASSETS:
        try:
            out.append((spec, find_asset(spec.relpath)))
        except AssetMissingError:
            out.append((spec, None))
    return out


# ---------------------------------------------------------------- fetching (user command only)

def fetch_mediapipe_models(dest_root: Path, wheel: Path | None = None) -> list[Path]:
    """Extract the face networks from the mediapipe wheel (downloaded with pip, not installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, MEDIAPIPE_WHEEL]
            subprocess.run(cmd, check=True)
            wheels = list(Path(tmp).glob("mediapipe-*.whl"))
            if not wheels:
                raise RuntimeError(f"pip download {MEDIAPIPE_WHEEL} produced no wheel")
            wheel = wheels[0]
        written = []
        with zipfile.ZipFile(wheel) as zf:
            for member, rel in MEDIAPIPE_MODELS.items():
                target = dest_root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(target)
    return written


def fetch_mediapipe_geometry(dest_root: Path) -> list[Path]:
    written = []
    for name in ("canonical_face_model.obj", "face_model_with_iris.obj"):
        target = dest_root / "mediapipe" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(MEDIAPIPE_GEOMETRY_BASE + name, timeout=60) as r:
            target.write_bytes(r.read())
        written.append(target)
    # The contour lists are MediaPipe's drawing constants, written out as JSON edge lists.
    contours = _mediapipe_contours_from_wheel()
    if contours is not None:
        target = dest_root / "mediapipe" / "face_mesh_contours.json"
        target.write_text(json.dumps(contours))
        written.append(target)
    return written


def _mediapipe_contours_from_wheel() -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, MEDIAPIPE_WHEEL]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("mediapipe-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            src = zf.read("mediapipe/python/solutions/face_mesh_connections.py").decode()
    return parse_contours(src)


def parse_contours(src: str) -> dict | None:
    """MediaPipe's face_mesh_connections.py text -> {contour name: [[a, b], ...]} in file order."""
    keys = {"FACEMESH_LIPS": "lips", "FACEMESH_LEFT_EYE": "left_eye", "FACEMESH_LEFT_EYEBROW": "left_eyebrow",
            "FACEMESH_LEFT_IRIS": "left_iris", "FACEMESH_RIGHT_EYE": "right_eye",
            "FACEMESH_RIGHT_EYEBROW": "right_eyebrow", "FACEMESH_RIGHT_IRIS": "right_iris",
            "FACEMESH_FACE_OVAL": "face_oval"}
    # read the edge lists as literals (frozenset([...]) assignments); nothing from the wheel is executed
    out = {}
    for node in ast.parse(src).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in keys and isinstance(node.value, ast.Call) and node.value.args):
            out[keys[node.targets[0].id]] = [list(e) for e in ast.literal_eval(node.value.args[0])]
    return out or None


def fetch_ict(dest_root: Path) -> Path:
    """Download ICT-FaceKit at the pinned commit and convert it to the npz layout the engine reads."""
    from engine.ict_convert import convert_facexmodel

    with urllib.request.urlopen(ICT_REPO_ZIP, timeout=600) as r:
        data = r.read()
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(io.BytesIO(data)).extractall(tmp)
        src = next(Path(tmp).glob("*/FaceXModel"))
        target = dest_root / "ict_facekit" / "ict_face_model.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_facexmodel(src, target)
    return target
