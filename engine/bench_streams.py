"""Simulated live streams through the batching scheduler: how many 30 fps streams one device holds.

The layout a multi-stream server needs on a many-core machine: one *network process* owns the device, the
frames (decoded into shared memory, as a server's decoder would leave them) and the `BatchScheduler`;
*session processes* run the per-stream trackers (the ordinary `Tracker`: ROI logic, filters), a few streams
each, and send their network calls (frame handle + ROI) to the network process over a pipe. On a GPU the
tracked faces' Gauss-Newton fit is sent there too and batched on the device (`Regressor.fit_tracked`; the
expression MLP before it and the gaze after it stay in the session processes, `engine.batching.StageRegressor`);
new tracks, the identity phase, and on a CPU every face, are regressed per face in the session processes (the
NumPy fit holds the GIL, so it is spread over processes).

Each stream's frames arrive at 30 fps (streams phase-shifted); processing latency is arrival -> the
tracker's result for that frame. A frame that arrives while its stream is still busy with an earlier one
waits; one that is a whole frame interval late is dropped; the deadline given to the scheduler is arrival +
one frame interval. The simulation runs for a fixed time per stream count.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import threading
import time
from concurrent.futures import Future
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

PERIOD = 1.0 / 30.0


# ---------------------------------------------------------------- session process side

class _Remote:
    """A session process's connection to the network process: request ids -> their futures."""

    def __init__(self, conn):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.pending: dict[int, Future] = {}
        self.next_id = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self):
        from engine.batching import DeadlineExceeded

        while True:
            try:
                rid, ok, value = self.conn.recv()
            except (EOFError, OSError) as exc:
                with self.lock:  # the network process is gone: nothing may wait for it
                    pending, self.pending = self.pending, {}
                for fut in pending.values():
                    if fut.set_running_or_notify_cancel():
                        fut.set_exception(RuntimeError(f"network process: connection closed ({exc!r})"))
                return
            with self.lock:
                fut = self.pending.pop(rid)
            if not fut.set_running_or_notify_cancel():
                continue  # withdrawn by its caller (a re-detection answered too late)
            if ok:
                fut.set_result(value)
            elif value == "deadline":
                fut.set_exception(DeadlineExceeded("network process: deadline passed before dispatch"))
            else:
                fut.set_exception(RuntimeError(f"network process: {value}"))

    def submit(self, kind: str, payload, deadline: float | None) -> Future:
        fut: Future = Future()
        with self.lock:
            rid = self.next_id
            self.next_id += 1
            self.pending[rid] = fut
        with self.send_lock:
            self.conn.send((rid, kind, payload, deadline))
        return fut

    def call(self, kind: str, payload, deadline: float | None):
        return self.submit(kind, payload, deadline).result()


class _RemoteDetector:
    def __init__(self, stream):
        self.stream = stream

    def __call__(self, rgb):
        return self.submit(rgb).result()

    def submit(self, rgb):
        """The frame is named by its handle (it lives in the network process's shared memory)."""
        return self.stream.remote.submit("detect", self.stream.handle, self.stream.deadline)


class _RemoteLandmarker:
    model = "attention"

    def __init__(self, stream):
        self.stream = stream

    def to_tensor(self, rgb):
        return self.stream.handle  # the frame already lives in the network process

    def __call__(self, image, roi):
        return self.stream.remote.call("landmarks", (image, (roi.cx, roi.cy, roi.w, roi.h, roi.theta)),
                                       self.stream.deadline)


class _Stream:
    def __init__(self, remote, regressor, model, device_stages: bool, refiner=None):
        """``refiner``: a PrdlRefiner when the streams run PRDL (landmark masks, the tracker's PRDL path)."""
        from engine.batching import StageRefiner, StageRegressor
        from engine.tracker import Tracker, TrackerConfig

        self.remote = remote
        self.handle = None
        self.deadline = None
        reg = regressor
        if device_stages:  # tracked faces are fitted, and refined, in the network process's batched stages
            reg = StageRegressor(regressor, lambda item: self.remote.call("regress", item, self.deadline))
            if refiner is not None:
                refiner = StageRefiner(refiner, lambda problem: self.remote.call("refine", _sendable(problem),
                                                                                 self.deadline))
        segmenter = None
        if refiner is not None:
            from engine.segmentation import LandmarkSegmenter

            segmenter = LandmarkSegmenter()
        self.tracker = Tracker(_RemoteDetector(self), _RemoteLandmarker(self), reg, model,
                               TrackerConfig(prdl=refiner is not None), segmenter=segmenter, refiner=refiner)


def _sendable(problem):
    """A RefineProblem to pickle: its targets keep where the mask crop lies, not the masks (~130 KB a frame)."""
    from dataclasses import replace

    return replace(problem, targets=replace(problem.targets, masks=problem.targets.masks.frame()))


def _session_process(conn, stream_ids, clip_meta, start, seconds, result_queue, device_stages, prdl):
    try:
        import torch

        torch.set_num_threads(1)
        from engine.batching import DeadlineExceeded
        from engine.face_model import FaceModel
        from engine.regressor import Regressor

        shms = [shared_memory.SharedMemory(name=name) for name, _ in clip_meta]
        clips = [np.ndarray(shape, np.uint8, buffer=s.buf) for s, (_, shape) in zip(shms, clip_meta)]
        model = FaceModel.load()
        regressor = Regressor(model)
        remote = _Remote(conn)
        lat, parts, dropped = [], [], [0]  # parts: (detector ran, landmarks, regress, PRDL, tracker total ms)
        lock = threading.Lock()
        # warm-up: one short track per stream before the clock starts
        refiner = None
        if prdl:
            from engine.refine import PrdlRefiner

            refiner = PrdlRefiner(model, fixed_exp=regressor.fitter.fixed_exp)
        streams = {sid: _Stream(remote, regressor, model, device_stages, refiner) for sid in stream_ids}
        from engine import freeze_long_lived

        freeze_long_lived()
        for sid, st in streams.items():
            c = sid % len(clips)
            for i in range(3):
                st.handle = (sid, c, i)
                st.tracker.process(clips[c][i], i)
            st.tracker.reset_track()
        result_queue.put(("ready", None))
        while start.value == 0.0:
            time.sleep(0.001)
        if start.value < 0:  # the simulation was called off (another process failed to start)
            return
        t_start = start.value

        def run(sid):
            st = streams[sid]
            c = sid % len(clips)
            clip = clips[c]
            t0 = t_start + (sid * 0.00731) % PERIOD
            i = 0
            while True:
                arrival = t0 + i * PERIOD
                if arrival - t0 > seconds:
                    break
                now = time.perf_counter()
                if now < arrival:
                    time.sleep(arrival - now)
                elif now > arrival + PERIOD:
                    with lock:
                        dropped[0] += 1
                    i += 1
                    continue
                st.handle = (sid, c, i % len(clip))
                st.deadline = arrival + PERIOD
                try:
                    state = st.tracker.process(clip[i % len(clip)], i)
                    t = state.timings_ms
                    with lock:
                        lat.append(1e3 * (time.perf_counter() - arrival))
                        parts.append(("detect" in t, t.get("landmarks", 0.0), t.get("regress", 0.0),
                                      t.get("segment", 0.0) + t.get("prdl", 0.0), t.get("total", 0.0)))
                except DeadlineExceeded:
                    with lock:
                        dropped[0] += 1
                i += 1

        threads = [threading.Thread(target=run, args=(sid,)) for sid in stream_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result_queue.put(("done", {"latencies": lat, "parts": parts, "dropped": dropped[0]}))
        conn.close()
        for s in shms:
            s.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the network process
        result_queue.put(("error", f"{type(exc).__name__}: {exc}"))


# ---------------------------------------------------------------- network process side

class _FrameStore:
    """Frames on the device, uploaded once: the latest frame of each stream."""

    def __init__(self, landmarker, clips):
        self.landmarker = landmarker
        self.clips = clips
        self.latest: dict[int, tuple] = {}
        self.lock = threading.Lock()

    def rgb(self, handle):
        _sid, c, i = handle
        return self.clips[c][i]

    def tensor(self, handle):
        sid = handle[0]
        with self.lock:
            cached = self.latest.get(sid)
            if cached is not None and cached[0] == handle:
                return cached[1]
        t = self.landmarker.to_tensor(self.rgb(handle))
        with self.lock:
            self.latest[sid] = (handle, t)
        return t


def _serve(conn, scheduler, store, stop):
    """Requests of one session process -> the scheduler's stages; answers sent when each batch is done."""
    from engine.batching import DeadlineExceeded
    from engine.networks.preprocess import Roi

    send_lock = threading.Lock()

    def reply(rid, fut):
        try:
            msg = (rid, True, fut.result())
        except DeadlineExceeded:
            msg = (rid, False, "deadline")
        except BaseException as exc:  # noqa: BLE001
            msg = (rid, False, f"{type(exc).__name__}: {exc}")
        with send_lock:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                pass

    while not stop.is_set():
        try:
            if not conn.poll(0.05):
                continue
            rid, kind, payload, deadline = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "detect":
            fut = scheduler.detect.submit(store.rgb(payload), deadline)
        elif kind == "regress":
            fut = scheduler.regress.submit(payload, deadline)
        elif kind == "refine":
            fut = scheduler.refine.submit(payload, deadline)
        else:
            handle, r = payload
            fut = scheduler.landmarks.submit((store.tensor(handle), Roi(*r)), deadline)
        fut.add_done_callback(lambda f, rid=rid: reply(rid, f))


class _NetworkNode:
    """One network process's share of the streams: its scheduler (on its pack's device), the frames uploaded there,
    and the session processes it serves over pipes."""

    def __init__(self, pack, clip_meta, stream_ids: list[int], streams_per_process: int, seconds: float,
                 max_wait_ms: float, device_stages: bool | None, prdl: bool, start, ctx):
        from engine.batching import BatchScheduler

        self.shms = [shared_memory.SharedMemory(name=name) for name, _ in clip_meta]
        clips = [np.ndarray(shape, np.uint8, buffer=s.buf) for s, (_, shape) in zip(self.shms, clip_meta)]
        self.seconds = seconds
        self.scheduler = BatchScheduler(pack, max_wait_ms=max_wait_ms, device_stages=device_stages)
        self.scheduler.warm(prdl=prdl)
        store = _FrameStore(pack.landmarker, clips)
        self.results = ctx.Queue()
        self.stop = threading.Event()
        self.groups = [stream_ids[k:k + streams_per_process] for k in range(0, len(stream_ids), streams_per_process)]
        self.procs = []
        for ids in self.groups:
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_session_process, args=(theirs, ids, clip_meta, start, seconds, self.results,
                                                           self.scheduler.regress is not None, prdl), daemon=True)
            p.start()
            threading.Thread(target=_serve, args=(ours, self.scheduler, store, self.stop), daemon=True).start()
            self.procs.append(p)

    def wait_ready(self, timeout: float) -> str | None:
        """None when every session process has warmed up, else the first error."""
        for _ in self.groups:
            try:
                kind, value = self.results.get(timeout=timeout)
            except queue.Empty:
                return f"a session process did not get ready in {timeout:g} s"
            if kind == "error":
                return value
        self.base = dict(self.scheduler.stats()["landmarks"])
        return None

    def collect(self, timeout: float) -> dict:
        """The session processes' latencies once they are done, and this scheduler's batches during the run."""
        out = {"latencies": [], "parts": [], "dropped": 0, "errors": []}
        for _ in self.groups:
            try:
                kind, value = self.results.get(timeout=self.seconds + timeout)
            except queue.Empty:
                kind, value = "error", f"a session process did not finish in {self.seconds + timeout:g} s"
            if kind == "error":
                out["errors"].append(value)
            else:
                out["latencies"] += value["latencies"]
                out["parts"] += value["parts"]
                out["dropped"] += value["dropped"]
        stats = self.scheduler.stats()
        lm = stats["landmarks"]
        out.update(landmark_items=lm["items"] - self.base["items"], landmark_batches=lm["batches"] - self.base["batches"],
                   landmark_run_ms=lm["run_ms_median"], expired=sum(v["expired"] for v in stats.values()),
                   regress=stats.get("regress"))
        return out

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self.scheduler.close()
        for s in self.shms:
            s.close()


def _network_process(backend, clip_meta, stream_ids, streams_per_process, seconds, max_wait_ms, device_stages, prdl,
                     start, start_timeout, report, torch_threads: int):
    """A spawned network process: its own pack on ``backend`` ((device, backend name), its own CUDA context) serving
    a share of the streams; reports ("ready", None), then ("done", `_NetworkNode.collect`), or ("error", why)."""
    node = None
    try:
        import torch

        torch.set_num_threads(torch_threads)  # as the first network process (its environment says 1, for sessions)
        from engine.bench_gpu import make_backend
        from engine.pack import Pack

        node = _NetworkNode(Pack(make_backend(*backend)), clip_meta, stream_ids, streams_per_process, seconds,
                            max_wait_ms, device_stages, prdl, start, mp.get_context("spawn"))
        error = node.wait_ready(start_timeout)
        report.put(("error", error) if error else ("ready", None))
        if error is None:
            report.put(("done", node.collect(start_timeout)))
    except BaseException as exc:  # noqa: BLE001 - reported to the simulation
        report.put(("error", f"network process: {type(exc).__name__}: {exc}"))
    finally:
        if node is not None:
            node.close()


def _report(report, procs, timeout: float):
    """The next (kind, value) from the spawned network processes, or ("error", ...) when one has died or none spoke
    within ``timeout`` seconds."""
    t_end = time.perf_counter() + timeout
    while True:
        try:
            return report.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                return "error", f"a network process exited with code {dead[0]}"
            if time.perf_counter() > t_end:
                return "error", f"no word from a network process in {timeout:g} s"


def simulate(pack, clips: list[np.ndarray], n_streams: int, streams_per_process: int, seconds: float,
             max_wait_ms: float = 2.0, start_timeout: float = 120.0, device_stages: bool | None = None,
             network_processes: int = 1, backend: tuple[str, str] | None = None, prdl: bool = False) -> dict:
    """Run `n_streams` simulated 30 fps streams for `seconds`; `pack` is this (network) process's pack.
    ``device_stages``: the scheduler's choice (None: on a CUDA device) of batched fit and refine stages.
    ``network_processes`` > 1: the streams are shared among that many network processes -- this one and spawned
    ones, each with its own pack on ``backend`` ((device, backend name)), scheduler and CUDA context -- so that
    no one process's CPU work (frame uploads, pipes, stage threads under one GIL) bounds the streams.
    ``prdl``: the trackers refine every frame with PRDL (landmark masks): segmentation and target descriptors in the
    session processes, the refinement in the network process's refine stage (device stages) or per face there."""
    # a session process is one core's worth of work: without this, each would start a BLAS pool as wide as
    # the machine, and those pools fight over the cores (latency spikes in the per-face regressor)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if network_processes > 1 and backend is None:
        raise ValueError("simulate: network_processes > 1 needs the backend (device, name) to build their packs")
    ctx = mp.get_context("spawn")
    shms, meta = [], []
    for clip in clips:
        s = shared_memory.SharedMemory(create=True, size=clip.nbytes)
        np.ndarray(clip.shape, np.uint8, buffer=s.buf)[:] = clip
        shms.append(s)
        meta.append((s.name, clip.shape))
    start = ctx.Value("d", 0.0)
    report = ctx.Queue()
    n_net = max(1, min(network_processes, n_streams))
    shares = [list(range(n_streams))[k::n_net] for k in range(n_net)]
    spawned, node = [], None
    t_spawn = time.perf_counter()
    try:
        import torch

        for share in shares[1:]:  # not daemonic: a network process starts session processes of its own
            p = ctx.Process(target=_network_process, args=(backend, meta, share, streams_per_process, seconds,
                                                           max_wait_ms, device_stages, prdl, start, start_timeout,
                                                           report, torch.get_num_threads()))
            p.start()
            spawned.append(p)
        node = _NetworkNode(pack, meta, shares[0], streams_per_process, seconds, max_wait_ms, device_stages, prdl,
                            start, ctx)
        errors = [node.wait_ready(start_timeout)]
        errors += [_report(report, spawned, start_timeout + 120.0)[1] for _ in spawned]  # their packs load first
        startup = time.perf_counter() - t_spawn
        n_procs = sum(processes_for(len(sh), streams_per_process) for sh in shares)
        if any(errors):
            start.value = -1.0  # every waiting session process gives up
            return {"streams": n_streams, "processes": n_procs, "error": next(e for e in errors if e)}
        start.value = time.perf_counter() + 0.2
        runs = [node.collect(start_timeout)]
        for _ in spawned:
            kind, value = _report(report, spawned, seconds + start_timeout)
            runs.append(value if kind == "done" else {"errors": [value]})
    finally:
        if start.value == 0.0:
            start.value = -1.0  # an exception before the start: release the session processes
        if node is not None:
            node.close()
        for p in spawned:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        for s in shms:
            s.close()
            s.unlink()
    errors = [e for r in runs for e in r["errors"]]  # a failed run carries only its errors
    if errors:
        return {"streams": n_streams, "processes": n_procs, "error": errors[0]}
    lat = np.asarray([x for r in runs for x in r["latencies"]], float)
    parts = [x for r in runs for x in r["parts"]]
    dropped = sum(r["dropped"] for r in runs)
    items, batches = sum(r["landmark_items"] for r in runs), sum(r["landmark_batches"] for r in runs)
    run_ms = [r["landmark_run_ms"] for r in runs if r["landmark_run_ms"] is not None]
    out = {"streams": n_streams, "processes": n_procs, "network_processes": n_net, "prdl": prdl, "frames": int(lat.size),
           "dropped": dropped, "drop_rate": round(dropped / max(lat.size + dropped, 1), 4),
           "fps_per_stream": round(lat.size / n_streams / seconds, 2),
           "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
           "latency_ms_p95": round(float(np.percentile(lat, 95)), 2) if lat.size else None,
           "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
           "landmark_mean_batch": round(items / max(batches, 1), 2),
           "landmark_batch_run_ms_median": round(float(np.median(run_ms)), 3) if run_ms else None,
           "expired": sum(r["expired"] for r in runs), "startup_s": round(startup, 1),
           "regress": "batched on the device" if runs[0]["regress"] else "per face in the session processes"}
    reg = [r["regress"] for r in runs if r["regress"]]
    if reg:
        out["regress_mean_batch"] = round(float(np.mean([g["mean_batch"] for g in reg])), 2)
        out["regress_batch_run_ms_median"] = float(np.median([g["run_ms_median"] or 0.0 for g in reg]))
    out.update(_latency_parts(lat, parts))
    out["held"] = bool(lat.size and out["latency_ms_p95"] <= 15.0 and out["drop_rate"] <= 0.01)
    return out


def _latency_parts(lat: np.ndarray, parts: list) -> dict:
    """Where a frame's latency goes (p50 / p95 ms): the tracker's landmark and regression calls (each including
    its queueing in the network process), PRDL (segmentation, targets and refinement), the tracker's whole run, the wait before it (the stream's previous
    frame still running), and the latency of frames with and without a detector run."""
    if not lat.size:
        return {}
    det, lm, reg, prdl, total = (np.asarray(a, float) for a in zip(*parts))
    det = det.astype(bool)

    def pct(a):
        return [round(float(np.percentile(a, 50)), 2), round(float(np.percentile(a, 95)), 2)] if a.size else None

    return {"parts_ms_p50_p95": {"landmarks": pct(lm), "regress": pct(reg), "prdl": pct(prdl), "tracker": pct(total),
                                 "before_tracker": pct(lat - total)},
            "detect_frames": round(float(det.mean()), 4),
            "latency_ms_p50_p95_detect_frames": pct(lat[det]),
            "latency_ms_p50_p95_tracked_frames": pct(lat[~det])}


def load_clips(media: Path, names, n_frames: int = 60, size: int = 512) -> list[np.ndarray]:
    from engine.bench_gpu import load_frames

    return [np.stack(load_frames(media, [name], n_frames, size)) for name in names]


def processes_for(n_streams: int, per_process: int) -> int:
    return math.ceil(n_streams / per_process)
