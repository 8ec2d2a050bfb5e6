"""Batching scheduler: the networks' work from many sessions, run as one batch per stage.

Each stage (face detection, landmarks) has one worker thread. Sessions submit items from any thread
(`submit` -> concurrent.futures.Future, `submit_async` -> awaitable, `call` -> blocking). The worker takes
the first waiting item, keeps collecting for at most `max_wait_ms` (or until `max_batch` items), runs the
stage once on the whole batch and hands each session its own result. A batch that raises is run again item by
item, so that only the items that fail get the error (one session's bad frame does not drop the others').

Deadlines (time.perf_counter() seconds): the collection window closes early enough that the earliest
deadline in the batch can still be met (window end <= deadline - recent batch run time - margin); an item whose
deadline has passed when its batch is dispatched is not run and its future fails with DeadlineExceeded;
`call` stops waiting at the deadline and withdraws the item if the worker has not started it. A batch
already running on the device is never interrupted, so a caller can get a result up to one batch run
late, never a frame that waited in the queue past its deadline.

`BatchScheduler` wires the stages to a Pack's detector and landmarker and makes per-session trackers
(the ordinary `Tracker`, its network calls routed through the stages). On a GPU two more stages run on the
device, each a captured CUDA graph per batch size: the Gauss-Newton fit of tracked faces (`Regressor.fit_tracked`;
each session runs its face's expression MLP before and its gaze after) and the PRDL refinement
(`engine.refine_torch`; each session segments its frame and computes its target descriptors). New tracks and the
identity phase are regressed in the session's own thread, and on a CPU every face is fitted and refined there
(the per-face NumPy code is the faster one on a CPU).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class DeadlineExceeded(TimeoutError):
    """The item's deadline passed before the stage ran it; it was dropped, not processed."""


@dataclass
class _Request:
    item: Any
    deadline: float | None
    future: Future
    t_submit: float


@dataclass
class StageStats:
    batches: int = 0
    items: int = 0
    expired: int = 0
    withdrawn: int = 0
    split: int = 0  # failed batches re-run item by item
    sizes: collections.Counter = field(default_factory=collections.Counter)
    run_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2048))
    wait_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8192))

    def summary(self) -> dict:
        run = np.asarray(self.run_ms, float)
        wait = np.asarray(self.wait_ms, float)
        return {"batches": self.batches, "items": self.items, "expired": self.expired, "withdrawn": self.withdrawn,
                "split": self.split,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
                "max_batch": max(self.sizes) if self.sizes else 0,
                "run_ms_median": round(float(np.median(run)), 3) if run.size else None,
                "queue_wait_ms_p95": round(float(np.percentile(wait, 95)), 3) if wait.size else None}


class StageBatcher:
    """One stage: `fn(list of items) -> list of results` (same order), run in one worker thread."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 64, max_wait_ms: float = 2.0,
                 name: str = "stage", margin_ms: float = 1.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.name = name
        self.margin = margin_ms / 1e3  # thread wake-up and dispatch slack kept before a deadline
        self.stats = StageStats()
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._run_estimate = 0.0  # seconds; recent batch run time, for closing windows before deadlines
        self._thread = threading.Thread(target=self._worker, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ client side
    def submit(self, item, deadline: float | None = None) -> Future:
        fut: Future = Future()
        req = _Request(item, deadline, fut, time.perf_counter())
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher '{self.name}' is closed")
            self._queue.append(req)
            self._cond.notify()
        return fut

    async def submit_async(self, item, deadline: float | None = None):
        """Awaitable result (for asyncio servers); DeadlineExceeded as for submit."""
        return await asyncio.wrap_future(self.submit(item, deadline))

    def call(self, item, deadline: float | None = None):
        """Submit and wait, at most until the deadline: then the item is withdrawn if not yet started
        (DeadlineExceeded), or its already running batch is waited for."""
        fut = self.submit(item, deadline)
        if deadline is None:
            return fut.result()
        try:
            return fut.result(timeout=max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            if fut.cancel():
                self.stats.withdrawn += 1
                raise DeadlineExceeded(f"{self.name}: deadline passed while queued") from None
            return fut.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ worker
    def _collect(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            window_end = self._queue[0].t_submit + self.max_wait
            while len(self._queue) < self.max_batch and not self._closed:
                deadlines = [r.deadline for r in self._queue if r.deadline is not None]
                end = window_end if not deadlines else min(window_end, min(deadlines) - self._run_estimate - self.margin)
                remaining = end - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _run(self, live: list[_Request]) -> None:
        """Run the stage on ``live`` (futures already running) and hand out the results; raises what the stage
        raised, with no future set."""
        t0 = time.perf_counter()
        results = self.fn([r.item for r in live])
        if len(results) != len(live):
            raise RuntimeError(f"{self.name}: stage returned {len(results)} results for {len(live)} items")
        dt = time.perf_counter() - t0
        # a cautious estimate: jumps up at once, decays slowly
        self._run_estimate = max(dt, 0.8 * self._run_estimate + 0.2 * dt)
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.sizes[len(live)] += 1
        self.stats.run_ms.append(1e3 * dt)
        for r, res in zip(live, results):
            r.future.set_result(res)

    def _expire(self, r: _Request, now: float) -> bool:
        """Fail ``r`` (its future running) if its deadline has passed."""
        if r.deadline is None or now <= r.deadline:
            return False
        self.stats.expired += 1
        r.future.set_exception(DeadlineExceeded(
            f"{self.name}: deadline passed {1e3 * (now - r.deadline):.2f} ms before dispatch"))
        return True

    def _run_one_by_one(self, live: list[_Request], batch_error: BaseException) -> None:
        """After a failed batch: each item alone, so that only the failing ones get an error. When the first two
        fail as well, the failure is the stage's, not an item's: the rest get the batch's error without a run."""
        self.stats.split += 1
        tried = failed = 0
        for r in live:
            if self._expire(r, time.perf_counter()):
                continue
            if tried >= 2 and failed == tried:
                r.future.set_exception(batch_error)
                continue
            tried += 1
            try:
                self._run([r])
            except BaseException as exc:  # noqa: BLE001
                failed += 1
                r.future.set_exception(exc)

    def _worker(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            now = time.perf_counter()
            live = []
            for r in batch:
                if not r.future.set_running_or_notify_cancel():
                    continue  # withdrawn by its caller
                if self._expire(r, now):
                    continue
                self.stats.wait_ms.append(1e3 * (now - r.t_submit))
                live.append(r)
            if not live:
                continue
            try:
                self._run(live)
            except BaseException as exc:  # noqa: BLE001 - one session's bad item must not fail the others' frames
                if len(live) == 1:
                    live[0].future.set_exception(exc)
                else:
                    self._run_one_by_one(live, exc)


# ---------------------------------------------------------------- the tracker's stages

class _SessionDetector:
    """What a Tracker sees as its detector: frames go through the shared detect stage."""

    def __init__(self, session: "Session"):
        self.session = session

    def __call__(self, rgb):
        return self.session.scheduler.detect.call(rgb, self.session.deadline)

    def submit(self, rgb):
        """A re-detection: the tracker takes the answer on its next frame (`Tracker._apply_redetection`)."""
        return self.session.scheduler.detect.submit(rgb, self.session.deadline)


class _SessionLandmarker:
    """What a Tracker sees as its landmarker: crops go through the shared landmark stage."""

    def __init__(self, session: "Session", landmarker):
        self.session = session
        self.landmarker = landmarker
        self.model = landmarker.model

    def to_tensor(self, rgb):
        return self.landmarker.to_tensor(rgb)  # uploaded once per frame, in the session's thread

    def __call__(self, image, roi):
        return self.session.scheduler.landmarks.call((image, roi), self.session.deadline)


class StageRegressor:
    """What a Tracker sees as its regressor when tracked faces are fitted elsewhere in batches. A tracked face's
    expression MLP and its gaze run here (`Regressor.tracked_fits`, `Regressor.finish`: CPU work, spread over
    the sessions); only the Gauss-Newton fit goes to ``submit(TrackedFit)``, which returns its FitResult (a
    batched device stage: `Regressor.fit_tracked`). New tracks and the identity phase are regressed here, per
    face."""

    def __init__(self, regressor, submit: Callable):
        self.regressor = regressor
        self.submit = submit

    def regress(self, landmarks_px, camera, identity, previous=None, fit_identity: bool = False):
        if previous is None or fit_identity:
            return self.regressor.regress(landmarks_px, camera, identity, previous, fit_identity=fit_identity)
        item = self.regressor.tracked_fits([landmarks_px], [camera], [identity], [previous])[0]
        fit = self.submit(item)
        return self.regressor.finish([fit], [landmarks_px], [camera], [item.exp_head])[0]


class StageRefiner:
    """What a Tracker sees as its PRDL refiner when refinements run elsewhere in batches: the target descriptors
    of a frame's part masks are computed here (`PrdlRefiner.targets`, CPU work spread over the sessions), the
    refinement goes to ``submit(RefineProblem)``, which returns its RefineResult."""

    def __init__(self, refiner, submit: Callable):
        self.refiner = refiner
        self.submit = submit

    def targets(self, masks, part_weights=None):
        return self.refiner.targets(masks, part_weights)

    def refine(self, targets, camera, rotation_cam, translation, expression, identity, *, exp_prior=None,
               exp_prev=None, part_weights=None):
        from engine.refine import RefineProblem

        return self.submit(RefineProblem(targets, camera, rotation_cam, translation, expression, identity,
                                         exp_prior, exp_prev, part_weights))


class Session:
    """One stream: a Tracker whose network calls are batched with every other session's."""

    def __init__(self, scheduler: "BatchScheduler", config=None, camera=None, profile=None, masks: str = "landmarks"):
        from engine.tracker import Tracker

        self.scheduler = scheduler
        self.deadline: float | None = None
        pack = scheduler.pack
        segmenter = refiner = None
        if config is not None and config.prdl:  # segmentation in this thread; refinement here or in its stage
            segmenter, refiner = pack._prdl_parts(masks)
            if scheduler.refine is not None:
                refiner = StageRefiner(refiner, lambda problem: scheduler.refine.call(problem, self.deadline))
        regressor = pack.regressor
        if scheduler.regress is not None:
            regressor = StageRegressor(pack.regressor, lambda item: scheduler.regress.call(item, self.deadline))
        self.tracker = Tracker(_SessionDetector(self), _SessionLandmarker(self, pack.landmarker), regressor,
                               pack.model, config, camera, segmenter=segmenter, refiner=refiner, profile=profile)

    def process(self, rgb: np.ndarray, frame_index: int, deadline: float | None = None, **kw):
        """Tracker.process with batched network stages. `deadline` (time.perf_counter() seconds) bounds
        each stage's queueing; when it passes first, DeadlineExceeded is raised and the frame is dropped
        (the track's state stays as it was before the frame, except a pending detector run; the previous frame's
        re-detection, applied at the frame's start, may have moved its region)."""
        self.deadline = deadline
        try:
            return self.tracker.process(rgb, frame_index, **kw)
        finally:
            self.deadline = None


class BatchScheduler:
    """The detect, landmark and (on a GPU) fit and refine stages of one Pack, shared by any number of sessions.

    ``device_stages``: run the tracked faces' fit and PRDL refinement as batched stages on the pack's device (None:
    when the backend runs on a CUDA device)."""

    def __init__(self, pack, max_wait_ms: float = 2.0, max_batch: int = 64, detect_max_batch: int = 16,
                 device_stages: bool | None = None):
        self.pack = pack
        self.max_wait_ms = max_wait_ms
        self.max_batch = max_batch
        self.detect = StageBatcher(pack.detector.batch, detect_max_batch, max_wait_ms, "detect")
        self.landmarks = StageBatcher(pack.landmarker.batch, max_batch, max_wait_ms, "landmarks")
        device = getattr(pack.backend, "device", None)
        if device_stages is None:
            device_stages = getattr(device, "type", None) == "cuda"
        self.stage_device = (device or "cpu") if device_stages else None
        self.regress = self.refine = None
        if device_stages:
            self.regress = StageBatcher(self._regress_batch, max_batch, max_wait_ms, "regress")
            self.refine = StageBatcher(self._refine_batch, max_batch, max_wait_ms, "refine")

    def _regress_batch(self, items: list) -> list:
        return self.pack.regressor.fit_tracked(items, device=self.stage_device)

    def _refine_batch(self, problems: list) -> list:
        return self.device_refiner().refine(problems)

    def device_refiner(self):
        """The refine stage's TorchRefiner (the pack's, on the stage device)."""
        return self.pack.device_refiner(self.stage_device)

    def warm(self, prdl: bool = True) -> int:
        """Capture the CUDA graphs of every batch bucket now (cuda backend: the networks, the batched fit and, with
        ``prdl``, the PRDL refinement), not on the first frames.
        Returns the number of captured shapes (0 on backends without graphs)."""
        runner = getattr(self.pack.backend, "runner", None)
        n = 0
        for net, shape, sizes in ((self.pack.landmarker.net, (3, 192, 192), None),
                                  (self.pack.detector.net, (3, 128, 128), None)):
            r = runner(net) if runner is not None else None
            if r is not None:
                n += r.warm([shape], sizes=sizes)
        if self.regress is not None:  # the batched fit's graphs (one per bucket size)
            n += self.pack.regressor.warm_batch(self.stage_device, self.max_batch)
        if prdl and self.refine is not None:  # the refinement's graphs (one per bucket size and part set)
            n += self.device_refiner().warm(self.max_batch)
        return n

    def session(self, config=None, camera=None, profile=None, masks: str = "landmarks") -> Session:
        return Session(self, config, camera, profile, masks)

    def stats(self) -> dict:
        out = {"detect": self.detect.stats.summary(), "landmarks": self.landmarks.stats.summary()}
        for name, stage in (("regress", self.regress), ("refine", self.refine)):
            if stage is not None:
                out[name] = stage.stats.summary()
        return out

    def close(self) -> None:
        self.detect.close()
        self.landmarks.close()
        for stage in (self.regress, self.refine):
            if stage is not None:
                stage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
