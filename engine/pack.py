"""The default model pack `open`: MediaPipe detector + attention mesh, the coefficient regressor and the
ICT-FaceKit face model, assembled into a tracker on one backend."""
from __future__ import annotations

import threading

from engine import freeze_long_lived
from engine.backends import select_backend
from engine.detection import FaceDetector
from engine.face_model import FaceModel
from engine.landmarks import Landmarker
from engine.regressor import Regressor
from engine.tracker import Tracker, TrackerConfig

PACK_NAME = "open"


class Pack:
    """Loads the networks and the face model once; makes any number of per-video trackers."""

    def __init__(self, backend="auto", landmark_model: str = "attention", threads: int | None = None):
        # a backend name ("auto", "torch", "cuda", "tensorrt") or a backend object
        self.backend = select_backend(backend, threads=threads) if isinstance(backend, str) else backend
        self.model = FaceModel.load()
        self.detector = FaceDetector(self.backend)
        self.landmarker = Landmarker(self.backend, landmark_model)
        self.regressor = Regressor(self.model)
        self.landmark_model = landmark_model
        self._segmenters: dict = {}
        self._refiner = None
        self._device_refiners: dict = {}
        self._lock = threading.Lock()
        freeze_long_lived()  # the loaded networks and torch: out of the collector's full passes

    def tracker(self, config: TrackerConfig | None = None, camera=None, masks: str = "landmarks",
                profile=None) -> Tracker:
        """A per-video tracker. With config.prdl, part masks come from `masks`: "landmarks" (rasterised from
        the landmark contours) or "parser" (the BiSeNetV2 face parser, a quality mode)."""
        segmenter = refiner = None
        if config is not None and config.prdl:
            segmenter, refiner = self._prdl_parts(masks)
        return Tracker(self.detector, self.landmarker, self.regressor, self.model, config, camera,
                       segmenter=segmenter, refiner=refiner, profile=profile)

    def _prdl_parts(self, masks: str):
        from engine.segmentation import LandmarkSegmenter, ParserSegmenter

        if masks not in ("landmarks", "parser"):
            raise ValueError(f"unknown part-mask engine '{masks}'; choose landmarks or parser")
        if masks not in self._segmenters:
            self._segmenters[masks] = LandmarkSegmenter() if masks == "landmarks" else ParserSegmenter(self.backend)
        return self._segmenters[masks], self.refiner()

    def refiner(self):
        """The PRDL refiner every tracker of this pack shares (built on first use)."""
        from engine.refine import PrdlRefiner

        if self._refiner is None:
            self._refiner = PrdlRefiner(self.model, fixed_exp=self.regressor.fitter.fixed_exp)
        return self._refiner

    def device_refiner(self, device):
        """That refiner's batched solve on a torch device (`engine.refine_torch`), one per device, so that its CUDA
        graphs are captured once whatever schedulers come and go."""
        from engine.cuda_graphs import canonical_device
        from engine.refine_torch import TorchRefiner

        device = canonical_device(device)
        with self._lock:  # schedulers on several threads may ask at once
            if device not in self._device_refiners:
                self._device_refiners[device] = TorchRefiner(self.refiner(), device)
            return self._device_refiners[device]

    def describe(self) -> dict:
        return {"pack": PACK_NAME, "backend": self.backend.describe(), "landmarks": self.landmark_model}
