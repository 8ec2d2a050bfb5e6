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
from engine.gaze import ICT_EYE_LOOK, GazeEstimator, eye_look_expression, eye_look_mask
from engine.geometry import Camera, rotation_from_6d
from engine.networks.coeff_head import N_INPUT_POINTS, CoefficientHead, expression_features, load_head

# Relative trust per landmark group: eyelids and lips carry the expressions users care about most;
# the face-oval points sit on the silhouette, where a mesh correspondence is least exact.
OPPOSING = [("jawLeft", "jawRight"), ("mouthLeft", "mouthRight"), ("eyeWide_L", "eyeBlink_L"),
            ("eyeWide_R", "eyeBlink_R"), ("eyeWide_L", "eyeSquint_L"), ("eyeWide_R", "eyeSquint_R"),
            ("mouthSmile_L", "mouthFrown_L"), ("mouthSmile_R", "mouthFrown_R"), ("browDown_L", "browOuterUp_L"),
            ("browDown_R", "browOuterUp_R"), ("browDown_L", "browInnerUp_L"), ("browDown_R", "browInnerUp_R")]
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


@dataclass
class TrackedFit:
    """A tracked face ready for the batched fit (`Regressor.tracked_fits` -> `fit_tracked`)."""

    landmarks_px: np.ndarray  # (478, >=2)
    camera: Camera
    identity: np.ndarray
    previous: FitResult
    exp_head: np.ndarray  # (n_exp,) the expression MLP's answer (eyeLook: the previous frame's): the prior


class Regressor:
    def __init__(self, model: FaceModel, head: CoefficientHead | None = None, n_id_fit: int = 40,
                 weights: FitWeights | None = None):
        self.model = model
        self.head = head if head is not None else load_head()
        fixed = eye_look_mask(model.n_exp)
        self.gaze = GazeEstimator(model)
        self.fitter = LandmarkFitter(model.lm_neutral, model.lm_id, model.lm_exp, np.arange(N_INPUT_POINTS),
                                     landmark_weights(), fixed, n_id_fit=n_id_fit, weights=weights,
                                     opposing_pairs=[(model.exp_names.index(a), model.exp_names.index(b))
                                                     for a, b in OPPOSING])
        self._batched: dict = {}  # device -> BatchedLandmarkFitter (built on first use)

    def head_rotation(self, landmarks_px: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            pts = torch.from_numpy(np.ascontiguousarray(landmarks_px[None, :N_INPUT_POINTS, :2], np.float32))
            rot6 = self.head.rotation6d(pts)
        return rotation_from_6d(rot6[0].numpy().astype(np.float64))

    def head_expression(self, landmarks_px: np.ndarray, camera: Camera, rotation_cam: np.ndarray,
                        translation: np.ndarray, identity: np.ndarray) -> np.ndarray:
        return self.head_expressions([landmarks_px], [camera], [rotation_cam], [translation], [identity])[0]

    def head_expressions(self, landmarks_px: list[np.ndarray], cameras: list[Camera], rotations: list[np.ndarray],
                         translations: list[np.ndarray], identities: list[np.ndarray]) -> np.ndarray:
        """`head_expression` of many faces in one call of the expression MLP: (B, n_exp)."""
        rc, t = np.stack(rotations), np.stack(translations)
        neutral = self.fitter.model_points(np.stack(identities), np.zeros(self.model.n_exp))
        refs = Camera.project_each(cameras, neutral @ rc.transpose(0, 2, 1) + t[:, None, :])
        scales = np.array([c.fx for c in cameras]) / np.maximum(t[:, 2], 1e-3)
        with torch.inference_mode():
            offsets, yaw_pitch = expression_features(
                torch.from_numpy(np.ascontiguousarray(np.stack([lm[:N_INPUT_POINTS, :2] for lm in landmarks_px]),
                                                      np.float32)),
                torch.from_numpy(refs.astype(np.float32)),
                torch.from_numpy(scales.astype(np.float32)),
                torch.from_numpy(np.stack(rotations).astype(np.float32)))
            exp = self.head.expression(offsets, yaw_pitch)
        return exp.numpy().astype(np.float64)

    def tracked_fits(self, landmarks_px: list[np.ndarray], cameras: list[Camera], identities: list[np.ndarray],
                     previous: list[FitResult]) -> list["TrackedFit"]:
        """The first step of regressing tracked faces (previous frame known, identity held): the expression
        MLP's answer (one call for all faces), with the eyeLook shapes of the previous frame -- the fit's prior."""
        eye_look = list(ICT_EYE_LOOK.values())
        exp_head = self.head_expressions(landmarks_px, cameras, [p.rotation_cam for p in previous],
                                         [p.translation for p in previous], identities)
        exp_head[:, eye_look] = np.stack([p.expression for p in previous])[:, eye_look]
        return [TrackedFit(lm, cam, ident, prev, head)
                for lm, cam, ident, prev, head in zip(landmarks_px, cameras, identities, previous, exp_head)]

    def fit_tracked(self, items: list["TrackedFit"], device: torch.device | str = "cpu") -> list[FitResult]:
        """The second step: one batched Gauss-Newton fit of all faces on ``device`` (`engine.fitting_batched`;
        on CUDA a captured graph). Pure arithmetic: the step a GPU stage runs for many sessions."""
        if not items:
            return []
        key = _device_key(device)
        if key not in self._batched:
            from engine.fitting_batched import BatchedLandmarkFitter

            self._batched[key] = BatchedLandmarkFitter(self.fitter, device)
        prev_exp = np.stack([it.previous.expression for it in items])
        return self._batched[key].fit(np.stack([it.landmarks_px[:, :2] for it in items]), [it.camera for it in items],
                                      np.stack([it.previous.rotation_cam for it in items]),
                                      np.stack([it.previous.translation for it in items]), prev_exp,
                                      np.stack([it.identity for it in items]),
                                      np.stack([it.exp_head for it in items]), prev_exp, iterations=3)

    def regress_batch(self, landmarks_px: list[np.ndarray], cameras: list[Camera], identities: list[np.ndarray],
                      previous: list[FitResult], device: torch.device | str = "cpu") -> list[Regression]:
        """`regress` of many *tracked* faces at once (each with its previous frame's fit, identity held):
        `tracked_fits` (one expression-MLP call), `fit_tracked` (one batched fit on ``device``) and `finish`
        (gaze of all faces at once). Same answers as `regress` face by face to ~1e-8: the float32 expression MLP
        run on the batch differs from a run per face by ~1e-7, and it is the fit's prior."""
        if not landmarks_px:
            return []
        items = self.tracked_fits(landmarks_px, cameras, identities, previous)
        fits = self.fit_tracked(items, device)
        return self.finish(fits, landmarks_px, cameras, [it.exp_head for it in items])

    def warm_batch(self, device: torch.device | str, max_batch: int) -> int:
        """Run `regress_batch` once at every CUDA-graph bucket size up to ``max_batch`` (a frontal neutral face),
        so that no live frame waits for a graph capture. Returns the number of captured graphs (0 off CUDA)."""
        from engine.cuda_graphs import BUCKETS
        from engine.geometry import FLIP

        cam = Camera.from_fov(640, 480)
        ident = np.zeros(self.model.n_id)
        rc, t = FLIP.copy(), np.array([0.0, 0.0, 60.0])
        lm = cam.project(self.model.landmarks(ident).astype(np.float64) @ rc.T + t)
        prev = FitResult(rc, t, np.zeros(self.model.n_exp), ident, 0.0, 0.0, 0)
        for b in BUCKETS:  # up to the bucket that holds max_batch
            self.regress_batch([lm] * b, [cam] * b, [ident] * b, [prev] * b, device=device)
            if b >= max_batch:
                break
        return len(self.batched_graphs(device)["captured"])

    def batched_graphs(self, device) -> dict:
        """The batched fit's CUDA graphs on ``device``: captured (bucket, iterations) and failed captures."""
        fitter = self._batched.get(_device_key(device))
        if fitter is None:
            return {"captured": [], "errors": {}}
        return {"captured": sorted(fitter.graphs.graphs), "errors": {str(k): v for k, v in fitter.graphs.errors.items()}}

    def finish(self, fits: list[FitResult], landmarks_px: list[np.ndarray], cameras: list[Camera],
                exp_heads) -> list[Regression]:
        """The last step, after the fit, for a batch: mouthClose held under jawOpen, then gaze (all faces' eyes in one
        vectorised fit) and the eyeLook shapes it implies."""
        # mouthClose only makes sense on top of jawOpen (ICT README): keep mouthClose <= jawOpen
        jaw, close = self.model.exp_names.index("jawOpen"), self.model.exp_names.index("mouthClose")
        for fit in fits:
            fit.expression[close] = min(fit.expression[close], fit.expression[jaw])
        gazes = self.gaze.batch(np.stack([lm[:, :2] for lm in landmarks_px]), cameras, np.stack([f.rotation_cam for f in fits]),
                                np.stack([f.translation for f in fits]), np.stack([f.identity for f in fits]),
                                np.stack([f.expression for f in fits]))
        for fit, gaze in zip(fits, gazes):
            for k, v in eye_look_expression(gaze).items():
                fit.expression[k] = v
        return [Regression(fit, gaze, head) for fit, gaze, head in zip(fits, gazes, exp_heads)]

    def regress(self, landmarks_px: np.ndarray, camera: Camera, identity: np.ndarray,
                previous: FitResult | None = None, fit_identity: bool = False) -> Regression:
        # the eyeLook shapes are not fitted: they come from gaze, measured after the fit (last frame's
        # values shape the lids during this frame's fit)
        eye_look = list(ICT_EYE_LOOK.values())
        look_exp = np.zeros(self.model.n_exp)
        if previous is not None:
            look_exp[eye_look] = previous.expression[eye_look]
        obs = landmarks_px[:, :2]
        if previous is None:
            # new track: the pose MLP's rotation, then a rigid fit on the neutral face
            rc = self.head_rotation(landmarks_px)
            pts = self.fitter.model_points(identity, look_exp)
            t = self.fitter.initial_translation(obs[self.fitter.idx], rc, pts, camera)
            rigid = self.fitter.fit(obs, camera, rc, t, look_exp, identity, pose_only=True, iterations=6)
            rc, t = rigid.rotation_cam, rigid.translation
        else:
            rc, t = previous.rotation_cam, previous.translation
        exp_head = self.head_expression(landmarks_px, camera, rc, t, identity)
        exp_head[eye_look] = look_exp[eye_look]
        start_exp = exp_head.copy() if previous is None else previous.expression.copy()
        fit = self.fitter.fit(obs, camera, rc, t, start_exp, identity, exp_prior=exp_head,
                              exp_prev=None if previous is None else previous.expression,
                              fit_identity=fit_identity, iterations=(6 if previous is None else 3)
                              + (2 if fit_identity else 0))
        return self.finish([fit], [landmarks_px], [camera], [exp_head])[0]


def _device_key(device) -> str:
    """One key per device (`engine.cuda_graphs.canonical_device`): one batched fitter and one set of graphs."""
    from engine.cuda_graphs import canonical_device

    return str(canonical_device(device))
