"""Face detection stage: MediaPipe short-range detector, letterboxed input, weighted NMS."""
from __future__ import annotations

import numpy as np
import torch

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

    def batch(self, frames: list[np.ndarray]) -> list[list[Detection]]:
        """Batched __call__: frames of any sizes, letterboxed each, one network run per 64 frames."""
        if not frames:
            return []
        prepared = [letterbox_detector_input(self.backend.tensor(rgb)) for rgb in frames]
        x = torch.cat([p[0] for p in prepared])
        out = []
        for s in range(0, len(frames), 64):
            regressors, logits = self.backend.run(self.net, x[s:s + 64])
            for k in range(regressors.shape[0]):
                out.append(decode_detections(regressors[k:k + 1], logits[k:k + 1], prepared[s + k][1],
                                             min_score=self.min_score))
        return out
