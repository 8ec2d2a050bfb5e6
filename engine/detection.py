"""Face detection stage: MediaPipe short-range detector, letterboxed input, weighted NMS."""
from __future__ import annotations

import numpy as np

from engine.networks.face_detector import load_face_detector
from engine.networks.preprocess import Detection, decode_detections, letterbox_detector_input


class FaceDetector:
    def __init__(self, backend, min_score: float = 0.5):
        self.backend = backend
        self.net = backend.prepare(load_face_detector())
        self.min_score = min_score

    def __call__(self, rgb: np.ndarray) -> list[Detection]:
        """All faces in an RGB uint8 frame, most confident first, in image pixels."""
        x, info = letterbox_detector_input(self.backend.tensor(rgb))
        regressors, logits = self.backend.run(self.net, x)
        return decode_detections(regressors, logits, info, min_score=self.min_score)
