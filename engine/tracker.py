"""One video's per-frame path: detect (when needed) -> landmarks -> regress -> filter.

The tracker keeps per-video state only: the region of interest from the last frame, the identity
estimated over the first frames, the previous fit (warm start) and the temporal filters.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.arkit import ict_to_arkit
from engine.detection import FaceDetector
from engine.face_model import FaceModel
from engine.filters import OneEuroFilter
from engine.fitting import FitResult
from engine.geometry import FLIP, Camera, DEFAULT_HFOV_DEG, euler_to_matrix, matrix_to_euler, matrix_to_quat
from engine.landmarks import Landmarker
from engine.messages import FaceState
from engine.networks.preprocess import Roi, roi_from_detection, roi_from_landmarks
from engine.refine import LANDMARK_MASK_PART_WEIGHTS
from engine.regressor import Regressor

log = logging.getLogger("facestream.tracker")
REDETECT_MAX_WAIT_S = 0.5  # a re-detection not answered by the next frame's start + this is ignored


@dataclass
class TrackerConfig:
    hfov_deg: float = DEFAULT_HFOV_DEG  # camera field of view when intrinsics are unknown
    # re-run the detector every N frames even while tracking (0 = only when lost). A detector that runs elsewhere
    # (a batched stage: it has ``submit``) is asked beside the frame's own work and its verdict applied on the next
    # frame, so that frame's latency does not include it; an in-thread detector runs on the frame's path
    detect_every: int = 30
    presence_threshold: float = 0.5  # landmark network face-presence probability
    identity_frames: int = 30  # frames (near-frontal) that refine the identity before it is held
    identity_max_angle_deg: float = 25.0
    filter_pose_min_cutoff: float = 1.0  # One-Euro, Hz
    filter_pose_beta: float = 0.05
    filter_exp_min_cutoff: float = 2.0
    filter_exp_beta: float = 4.0
    filter: bool = True
    # PRDL refinement against part masks (engine/refine.py). On by default in `facestream track` / `bench`
    # (engine/cli.py, --no-prdl); off here, so that the server and calibration capture, which build TrackerConfig()
    # themselves, keep their behaviour (calibrated resting values rise with it: docs/BENCHMARKS.md). Batched
    # sessions run it when asked: per face in their own thread on a CPU, in the scheduler's refine stage on a GPU.
    prdl: bool = False
    prdl_mask_size: int = 128  # part-mask crop size, pixels


class Tracker:
    def __init__(self, detector: FaceDetector, landmarker: Landmarker, regressor: Regressor, model: FaceModel,
                 config: TrackerConfig | None = None, camera: Camera | None = None, segmenter=None, refiner=None,
                 profile=None):
        self.detector = detector
        # a user's calibration (calibration.profile.Profile or anything with identity_coefficients,
        # camera_for(w, h) and apply(state)); the engine does not import calibration/
        self.profile = profile
        self.segmenter = segmenter  # part masks for PRDL: anything with .segment(rgb, landmarks, size)
        self.refiner = refiner  # engine.refine.PrdlRefiner, used when config.prdl
        self.landmarker = landmarker
        self.regressor = regressor
        self.model = model
        self.config = config or TrackerConfig()
        self.fixed_camera = camera
        self.identity = np.zeros(model.n_id)
        self.identity_samples = 0
        if profile is not None and profile.identity_coefficients is not None:
            self.identity = np.asarray(profile.identity_coefficients, np.float64).copy()
            self.identity_samples = self.config.identity_frames  # calibrated: held from the first frame
        self._redetect: tuple[Future, np.ndarray] | None = None  # a re-detection under way and its frame
        self.reset_track()

    # ------------------------------------------------------------------ state
    def reset_track(self) -> None:
        """Forget the face's position (not its identity): the next frame runs the detector."""
        self.roi: Roi | None = None
        self.previous: FitResult | None = None
        self.frames_since_detect = 0
        if self._redetect is not None:
            self._redetect[0].cancel()  # (a queued detection no frame will use)
        self._redetect = None
        self.f_pose = OneEuroFilter(self.config.filter_pose_min_cutoff, self.config.filter_pose_beta)
        self.f_trans = OneEuroFilter(self.config.filter_pose_min_cutoff, self.config.filter_pose_beta)
        self.f_exp = OneEuroFilter(self.config.filter_exp_min_cutoff, self.config.filter_exp_beta)

    @property
    def identity_locked(self) -> bool:
        return self.identity_samples >= self.config.identity_frames

    def camera_for(self, width: int, height: int) -> Camera:
        if self.profile is not None:
            cam = self.profile.camera_for(width, height)
            if cam is not None:
                return cam
        cam = self.fixed_camera
        if cam is not None and (cam.width, cam.height) == (width, height):
            return cam
        return Camera.from_fov(width, height, self.config.hfov_deg)

    # ------------------------------------------------------------------ per frame
    def process(self, rgb: np.ndarray, frame_index: int, pts: float | None = None,
                ts_capture: float | None = None, t_seconds: float | None = None) -> FaceState:
        """Track one RGB frame (H, W, 3 uint8). t_seconds drives the filters (default: pts or wall clock).
        A frame sent for re-detection (a batched detector) may be read until the next call: do not overwrite it."""
        t_start = time.perf_counter()
        ts_capture = time.time() * 1000.0 if ts_capture is None else ts_capture
        state = FaceState(frame=frame_index, pts=pts, ts_capture=ts_capture)
        timings = state.timings_ms
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 16:
            raise ValueError(f"expected an RGB uint8 frame of at least 16x16, got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        image = self.landmarker.to_tensor(rgb)

        self._apply_redetection(w, h, timings)
        need_detect = self.roi is None
        if not need_detect and self.config.detect_every > 0 and self.frames_since_detect >= self.config.detect_every:
            need_detect = not self._start_redetection(rgb)
        roi = self._detect(rgb, timings) if need_detect else self.roi
        points, score = self._landmarks(image, roi, timings)
        if score < self.config.presence_threshold and not need_detect:
            # the tracked ROI lost the face (fast motion, occlusion): one detector retry this frame
            self.roi = None
            roi = self._detect(rgb, timings)
            points, score = self._landmarks(image, roi, timings)
        if score < self.config.presence_threshold:
            self.reset_track()
            state.score = float(score)
            timings["total"] = (time.perf_counter() - t_start) * 1e3
            return state
        t0 = time.perf_counter()
        camera = self.camera_for(w, h)
        fit_identity = not self.identity_locked and self._near_frontal()
        reg = self.regressor.regress(points, camera, self.identity, self.previous, fit_identity=fit_identity)
        fit = reg.fit
        timings["regress"] = (time.perf_counter() - t0) * 1e3
        if self.config.prdl and self.refiner is not None:
            fit = self._refine(rgb, points, camera, fit, state)
        # the track's state changes only now: a batched regression or refinement can drop the frame (deadline)
        self.frames_since_detect += 1
        if fit_identity:
            self.identity_samples += 1
            self.identity += (reg.fit.identity - self.identity) / self.identity_samples  # running mean
        self.previous = fit

        t0 = time.perf_counter()
        t_s = t_seconds if t_seconds is not None else (pts if pts is not None else time.time())
        rot_model = FLIP @ fit.rotation_cam
        euler = np.array(matrix_to_euler(rot_model))
        translation = fit.translation
        expression = fit.expression
        if self.config.filter:
            euler = self.f_pose(euler, t_s)
            translation = self.f_trans(translation, t_s)
            expression = np.clip(self.f_exp(expression, t_s), 0.0, 1.0)
        rot_model = euler_to_matrix(*euler)
        self.roi = roi_from_landmarks(points[:, :2])
        timings["filter"] = (time.perf_counter() - t0) * 1e3

        state.face = True
        state.score = float(score)
        state.expression = expression
        state.blendshapes = ict_to_arkit(expression)
        state.rotation = rot_model
        state.euler_deg = tuple(float(v) for v in euler)
        state.quat = matrix_to_quat(rot_model)
        state.translation_cm = np.asarray(translation, np.float64)
        state.gaze_deg = reg.gaze
        state.landmarks = points
        state.identity = self.identity.copy() if self.identity_locked else fit.identity
        state.landmarks68 = self.project_points(self.model.landmarks68(state.identity, expression), state, camera)
        if self.profile is not None:
            self.profile.apply(state)
        timings["total"] = (time.perf_counter() - t_start) * 1e3
        return state

    def _refine(self, rgb: np.ndarray, points: np.ndarray, camera: Camera, fit: FitResult,
                state: FaceState) -> FitResult:
        """PRDL refinement of the regressor's fit against this frame's part masks."""
        t0 = time.perf_counter()
        masks = self.segmenter.segment(rgb, points, self.config.prdl_mask_size)
        t1 = time.perf_counter()
        weights = LANDMARK_MASK_PART_WEIGHTS if masks.source == "landmarks" else None
        targets = self.refiner.targets(masks, weights)
        prev = self.previous.expression if self.previous is not None else None
        t2 = time.perf_counter()
        res = self.refiner.refine(targets, camera, fit.rotation_cam, fit.translation, fit.expression, fit.identity,
                                  exp_prior=fit.expression, exp_prev=prev, part_weights=weights)
        t3 = time.perf_counter()
        state.timings_ms["segment"] = (t1 - t0) * 1e3
        state.timings_ms["prdl"] = (t3 - t1) * 1e3  # target descriptors + refinement
        state.timings_ms["prdl_refine"] = (t3 - t2) * 1e3
        state.prdl = {"loss_before": round(res.loss_before, 4), "loss_after": round(res.loss_after, 4),
                      "iterations": res.iterations, "masks": masks.source}
        return FitResult(res.rotation_cam, res.translation, res.expression, fit.identity, fit.rms_cm, fit.rms_px,
                         fit.iterations)

    # ------------------------------------------------------------------ helpers
    def _detect(self, rgb: np.ndarray, timings: dict) -> Roi | None:
        t0 = time.perf_counter()
        pending, self._redetect = self._redetect, None  # (the previous frame's was applied at this one's start)
        if pending is not None:  # the face was lost on the frame sent for re-detection:
            detections = pending[0].result()  # its answer, not a second detector run
        else:
            detections = self.detector(rgb)
        timings["detect"] = timings.get("detect", 0.0) + (time.perf_counter() - t0) * 1e3
        self.frames_since_detect = 0
        return self._pick_roi(detections, rgb.shape[1], rgb.shape[0]) if detections else None

    def _start_redetection(self, rgb: np.ndarray) -> bool:
        """Ask a detector that runs elsewhere about this frame, answer wanted on the next frame (the tracked ROI
        serves this one). False: the detector runs in this thread, so the frame runs it on its path."""
        submit = getattr(self.detector, "submit", None)
        if submit is None:
            return False
        self._redetect = (submit(rgb), rgb)
        self.frames_since_detect = 0
        return True

    def _apply_redetection(self, w: int, h: int, timings: dict) -> None:
        """The previous frame's re-detection: the track moves to the detected face where the two disagree (no
        detection centred within a quarter of the ROI's width, `_pick_roi`). A detector that saw no face, failed or
        missed its deadline leaves the track alone: the landmark network's presence score decides, every frame,
        whether the face is lost. An answer about a frame of another size is not waited for."""
        if self._redetect is None:
            return
        (future, frame), self._redetect = self._redetect, None
        if frame.shape[:2] != (h, w):
            future.cancel()
            return
        t0 = time.perf_counter()
        try:
            detections = future.result(timeout=REDETECT_MAX_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - advisory: the next one comes detect_every frames later
            future.cancel()  # (still queued after the wait: withdrawn)
            if not isinstance(exc, TimeoutError):  # (a stage's DeadlineExceeded is a TimeoutError)
                log.warning("re-detection failed, the track goes on: %s: %s", type(exc).__name__, exc)
            return
        finally:
            timings["redetect_wait"] = (time.perf_counter() - t0) * 1e3
        if detections:
            self.roi = self._pick_roi(detections, w, h)

    def _landmarks(self, image, roi: Roi | None, timings: dict) -> tuple[np.ndarray | None, float]:
        if roi is None:
            return None, 0.0
        t0 = time.perf_counter()
        points, score = self.landmarker(image, roi)
        timings["landmarks"] = timings.get("landmarks", 0.0) + (time.perf_counter() - t0) * 1e3
        return points, score

    def _pick_roi(self, detections, w: int, h: int) -> Roi:
        """The most confident detection becomes the ROI; while tracking, the detection nearest the
        tracked face is used, and if it agrees with the landmark ROI that ROI is kept (it is tighter)."""
        if self.roi is None:
            return roi_from_detection(max(detections, key=lambda d: d.score), w, h)
        cx, cy = self.roi.cx, self.roi.cy
        near = min(detections, key=lambda d: (0.5 * (d.box[0] + d.box[2]) - cx) ** 2
                   + (0.5 * (d.box[1] + d.box[3]) - cy) ** 2)
        dx, dy = 0.5 * (near.box[0] + near.box[2]) - cx, 0.5 * (near.box[1] + near.box[3]) - cy
        if (dx * dx + dy * dy) ** 0.5 < 0.25 * self.roi.w:
            return self.roi
        return roi_from_detection(near, w, h)

    def _near_frontal(self) -> bool:
        if self.previous is None:
            return False  # the first fit of a track is too rough to teach the identity
        yaw, pitch, _ = matrix_to_euler(FLIP @ self.previous.rotation_cam)
        lim = self.config.identity_max_angle_deg
        return abs(yaw) < lim and abs(pitch) < lim

    @staticmethod
    def project_points(points_model: np.ndarray, state: FaceState, camera: Camera) -> np.ndarray:
        """Model-frame points (cm) -> image pixels with the state's (filtered) pose."""
        pc = points_model @ (FLIP @ state.rotation).T + state.translation_cm
        return camera.project(pc)
