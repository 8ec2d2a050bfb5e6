"""Landmark stage: 478 face points in image pixels for one ROI.

Default: MediaPipe's attention mesh (468 mesh points with refined lips and eyelids, plus 2 x 5 iris
points) in one network. Alternative (`mesh468`): the plain 468-point mesh plus the iris network run on
both eye crops, assembled to the same 478-point layout.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from engine.networks.face_landmarks import load_attention_mesh, load_face_landmarks
from engine.networks.iris import load_iris
from engine.networks.preprocess import (LANDMARK_SIZE, Roi, as_image_tensor, crop_eyes, crop_faces, crop_roi,
                                        project_eye_landmarks, project_landmarks, project_landmarks_batch)

LANDMARK_MODELS = ("attention", "mesh468")


class Landmarker:
    max_batch = 64  # faces per network run in batch(); the GPU backends' largest batch bucket

    def __init__(self, backend, model: str = "attention"):
        if model not in LANDMARK_MODELS:
            raise ValueError(f"unknown landmark model '{model}'; choose one of {', '.join(LANDMARK_MODELS)}")
        self.backend = backend
        self.model = model
        if model == "attention":
            self.net = backend.prepare(load_attention_mesh())
        else:
            self.net = backend.prepare(load_face_landmarks())
            self.iris = backend.prepare(load_iris())

    def to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """The frame as the float [3, H, W] tensor the crops sample from (done once per frame)."""
        return as_image_tensor(self.backend.tensor(rgb))

    def __call__(self, image: torch.Tensor, roi: Roi) -> tuple[np.ndarray, float]:
        """-> (478, 3) points in image pixels (z scaled like x) and the face-presence probability."""
        crop = crop_roi(image, roi, LANDMARK_SIZE)
        points, logit = self.backend.run(self.net, crop)
        score = 1.0 / (1.0 + math.exp(-max(-100.0, min(100.0, float(logit.reshape(-1)[0])))))
        pts = project_landmarks(points[0].float().cpu(), roi, LANDMARK_SIZE)
        if self.model == "mesh468":
            pts = self._add_irises(image, pts)
        return pts.numpy().astype(np.float64), score

    def batch(self, items: list[tuple[torch.Tensor, Roi]]) -> list[tuple[np.ndarray, float]]:
        """Batched __call__: faces from any number of frames (one (image, roi) each, images from
        to_tensor) through one network run per `max_batch` faces; per-face results in input order.
        Frames of one size are cropped with one sampling call (preprocess.crop_faces)."""
        if not items:
            return []
        x = crop_faces(items, LANDMARK_SIZE)
        points, logits = [], []
        for s in range(0, len(items), self.max_batch):
            p, lg = self.backend.run(self.net, x[s:s + self.max_batch])
            points.append(p)
            logits.append(lg.reshape(-1))
        points = torch.cat(points).float().cpu()
        logits = torch.cat(logits).float().cpu().clamp(-100.0, 100.0)
        scores = torch.sigmoid(logits.double()).tolist()
        if self.model == "mesh468":  # the iris network runs per face on its eye crops
            return [(self._add_irises(image, project_landmarks(points[i], roi, LANDMARK_SIZE)).numpy()
                     .astype(np.float64), float(scores[i])) for i, (image, roi) in enumerate(items)]
        pts = project_landmarks_batch(points, [roi for _, roi in items], LANDMARK_SIZE).numpy().astype(np.float64)
        return [(pts[i], float(scores[i])) for i in range(len(items))]

    def _add_irises(self, image: torch.Tensor, mesh: torch.Tensor) -> torch.Tensor:
        """Iris network on both eyes; iris centres + rings appended as points 468-477 (subject's right
        eye first, as in the attention model's layout)."""
        crops, rois = crop_eyes(image, mesh)
        _contours, iris = self.backend.run(self.iris, crops.to(image.device))
        iris = iris.float().cpu()
        right = project_eye_landmarks(iris[0], rois[0], flipped=False)  # image-left eye = subject's right
        left = project_eye_landmarks(iris[1], rois[1], flipped=True)
        # the iris model's z has its own origin: use the eye ring's mesh depth instead
        right[:, 2] = mesh[[33, 133, 159, 145], 2].mean()
        left[:, 2] = mesh[[362, 263, 386, 374], 2].mean()
        return torch.cat([mesh, right, left], dim=0)
