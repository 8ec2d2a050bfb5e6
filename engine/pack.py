"""The default model pack `open`: MediaPipe detector + attention mesh, the coefficient regressor and the
ICT-FaceKit face model, assembled into a tracker on one backend."""
from __future__ import annotations

from engine.backends import select_backend
from engine.detection import FaceDetector
from engine.face_model import FaceModel
from engine.landmarks import Landmarker
from engine.regressor import Regressor
from engine.tracker import Tracker, TrackerConfig

PACK_NAME = "open"


class Pack:
    """Loads the networks and the face model once; makes any number of per-video trackers."""

    def __init__(self, backend: str = "auto", landmark_model: str = "attention", threads: int | None = None):
        self.backend = select_backend(backend, threads=threads)
        self.model = FaceModel.load()
        self.detector = FaceDetector(self.backend)
        self.landmarker = Landmarker(self.backend, landmark_model)
        self.regressor = Regressor(self.model)
        self.landmark_model = landmark_model

    def tracker(self, config: TrackerConfig | None = None, camera=None) -> Tracker:
        return Tracker(self.detector, self.landmarker, self.regressor, self.model, config, camera)

    def describe(self) -> dict:
        return {"pack": PACK_NAME, "backend": self.backend.describe(), "landmarks": self.landmark_model}
