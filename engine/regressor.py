"""Regressor engine: 478 landmarks -> ICT-FaceKit coefficients (pose, expression, identity).

Three visible steps: gaze from the irises (fixes the eyeLook shapes), the learned head's guess
(expression and rotation; used as the start on a new track and as a prior always), then a few
Gauss-Newton iterations on all mesh landmarks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from engine.assets import find_asset
from engine.face_model import FaceModel
from engine.fitting import FitResult, FitWeights, LandmarkFitter
from engine.gaze import ICT_EYE_LOOK, GazeEstimator, eye_look_expression
from engine.geometry import Camera, rotation_from_6d
from engine.networks.coeff_head import N_INPUT_POINTS, CoefficientHead, load_head

# Relative trust per landmark group: eyelids and lips carry the expressions users care about most;
# the face-oval points sit on the silhouette, where a mesh correspondence is least exact.
GROUP_WEIGHTS = {"left_eye": 3.0, "right_eye": 3.0, "lips": 3.0, "left_eyebrow": 2.0, "right_eyebrow": 2.0,
                 "face_oval": 0.3}


@lru_cache(maxsize=1)
def landmark_weights() -> np.ndarray:
    contours = json.loads(find_asset("mediapipe/face_mesh_contours.json").read_text())
    w = np.ones(N_INPUT_POINTS)
    for group, weight in GROUP_WEIGHTS.items():
        for a, b in contours.get(group, []):
            for i in (a, b):
                if i < N_INPUT_POINTS:
                    w[i] = weight
    return w


@dataclass
class Regression:
    fit: FitResult
    gaze: dict[str, tuple[float, float]]
    head_expression: np.ndarray  # the learned head's guess (53,)


class Regressor:
    def __init__(self, model: FaceModel, head: CoefficientHead | None = None, n_id_fit: int = 40,
                 weights: FitWeights | None = None):
        self.model = model
        self.head = head if head is not None else load_head()
        fixed = np.zeros(model.n_exp, bool)
        fixed[list(ICT_EYE_LOOK.values())] = True
        self.gaze = GazeEstimator(model.lm_neutral)
        self.fitter = LandmarkFitter(model.lm_neutral, model.lm_id, model.lm_exp, np.arange(N_INPUT_POINTS),
                                     landmark_weights(), fixed, n_id_fit=n_id_fit, weights=weights)

    def head_guess(self, landmarks_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            pts = torch.from_numpy(np.ascontiguousarray(landmarks_px[None, :N_INPUT_POINTS, :2], np.float32))
            exp, rot6 = self.head(pts)
        return exp[0].numpy().astype(np.float64), rotation_from_6d(rot6[0].numpy().astype(np.float64))

    def regress(self, landmarks_px: np.ndarray, camera: Camera, identity: np.ndarray,
                previous: FitResult | None = None, fit_identity: bool = False) -> Regression:
        gaze = self.gaze(landmarks_px)
        look = eye_look_expression(gaze)
        exp_head, rot_head = self.head_guess(landmarks_px)
        for k, v in look.items():
            exp_head[k] = v
        if previous is None:
            start_exp = exp_head.copy()
            rc = rot_head
            pts = self.fitter.model_points(identity, start_exp)
            t = self.fitter.initial_translation(landmarks_px[self.fitter.idx, :2], rc, pts, camera)
            iterations, exp_prev = 10, None
        else:
            start_exp = previous.expression.copy()
            rc, t = previous.rotation_cam, previous.translation
            iterations, exp_prev = 3, previous.expression
        for k, v in look.items():
            start_exp[k] = v
        fit = self.fitter.fit(landmarks_px[:, :2], camera, rc, t, start_exp, identity, exp_prior=exp_head,
                              exp_prev=exp_prev, fit_identity=fit_identity,
                              iterations=iterations + (2 if fit_identity else 0))
        # mouthClose only makes sense on top of jawOpen (ICT README): keep mouthClose <= jawOpen
        jaw, close = self.model.exp_names.index("jawOpen"), self.model.exp_names.index("mouthClose")
        fit.expression[close] = min(fit.expression[close], fit.expression[jaw])
        return Regression(fit, gaze, exp_head)
