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
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

PERIOD = 1.0 / 30.0


# ---------------------------------------------------------------- session process side

class _Remote:
    """A session process's connection to the network process: request ids -> waiting threads."""

    def __init__(self, conn):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.pending: dict[int, list] = {}
        self.next_id = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self):
        while True:
            try:
                rid, ok, value = self.conn.recv()
            except (EOFError, OSError):
                return
            slot = self.pending.pop(rid)
            slot[1], slot[2] = ok, value
            slot[0].set()

    def call(self, kind: str, payload, deadline: float | None):
        with self.lock:
            rid = self.next_id
            self.next_id += 1
        slot = [threading.Event(), None, None]
        self.pending[rid] = slot
        with self.send_lock:
            self.conn.send((rid, kind, payload, deadline))
        slot[0].wait()
        if not slot[1]:
            from engine.batching import DeadlineExceeded
            if slot[2] == "deadline":
                raise DeadlineExceeded("network process: deadline passed before dispatch")
            raise RuntimeError(f"network process: {slot[2]}")
        return slot[2]


class _RemoteDetector:
    def __init__(self, stream):
        self.stream = stream

    def __call__(self, rgb):
        return self.stream.remote.call("detect", self.stream.handle, self.stream.deadline)


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
    def __init__(self, remote, regressor, model, remote_regress: bool):
        from engine.tracker import Tracker, TrackerConfig

        self.remote = remote
        self.handle = None
        self.deadline = None
        reg = regressor
        if remote_regress:  # tracked faces are regressed in the network process's batched stage
            from engine.batching import StageRegressor

            reg = StageRegressor(regressor, lambda item: self.remote.call("regress", item, self.deadline))
        self.tracker = Tracker(_RemoteDetector(self), _RemoteLandmarker(self), reg, model, TrackerConfig(prdl=False))


def _session_process(conn, stream_ids, clip_meta, start, seconds, result_queue, remote_regress):
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
        lat, parts, dropped = [], [], [0]  # parts: (detector ran, landmarks ms, regress ms, tracker total ms)
        lock = threading.Lock()
        # warm-up: one short track per stream before the clock starts
        streams = {sid: _Stream(remote, regressor, model, remote_regress) for sid in stream_ids}
        for sid, st in streams.items():
            c = sid % len(clips)
            for i in range(3):
                st.handle = (sid, c, i)
                st.tracker.process(clips[c][i], i)
            st.tracker.reset_track()
        result_queue.put(("ready", None))
        while start.value == 0.0:
            time.sleep(0.001)
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
                                      t.get("total", 0.0)))
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
        else:
            handle, r = payload
            fut = scheduler.landmarks.submit((store.tensor(handle), Roi(*r)), deadline)
        fut.add_done_callback(lambda f, rid=rid: reply(rid, f))


def simulate(pack, clips: list[np.ndarray], n_streams: int, streams_per_process: int, seconds: float,
             max_wait_ms: float = 2.0, start_timeout: float = 120.0, device_stages: bool | None = None) -> dict:
    """Run `n_streams` simulated 30 fps streams for `seconds`; `pack` is this (network) process's pack.
    ``device_stages``: the scheduler's choice (None: on a CUDA device) of a batched regress stage."""
    from engine.batching import BatchScheduler

    # a session process is one core's worth of work: without this, each would start a BLAS pool as wide as
    # the machine, and those pools fight over the cores (latency spikes in the per-face regressor)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    ctx = mp.get_context("spawn")
    shms, meta = [], []
    for clip in clips:
        s = shared_memory.SharedMemory(create=True, size=clip.nbytes)
        np.ndarray(clip.shape, np.uint8, buffer=s.buf)[:] = clip
        shms.append(s)
        meta.append((s.name, clip.shape))
    store_clips = [np.ndarray(shape, np.uint8, buffer=s.buf) for s, (_, shape) in zip(shms, meta)]
    scheduler = BatchScheduler(pack, max_wait_ms=max_wait_ms, device_stages=device_stages)
    scheduler.warm()
    store = _FrameStore(pack.landmarker, store_clips)
    start = ctx.Value("d", 0.0)
    results = ctx.Queue()
    stop = threading.Event()
    groups = [list(range(k, min(k + streams_per_process, n_streams))) for k in range(0, n_streams, streams_per_process)]
    procs, servers = [], []
    t_spawn = time.perf_counter()
    try:
        for ids in groups:
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_session_process, args=(theirs, ids, meta, start, seconds, results,
                                                           scheduler.regress is not None), daemon=True)
            p.start()
            th = threading.Thread(target=_serve, args=(ours, scheduler, store, stop), daemon=True)
            th.start()
            procs.append(p)
            servers.append(th)
        for _ in groups:
            kind, value = results.get(timeout=start_timeout)
            if kind == "error":
                return {"streams": n_streams, "processes": len(groups), "error": value}
        startup = time.perf_counter() - t_spawn
        base = dict(scheduler.stats()["landmarks"])
        start.value = time.perf_counter() + 0.2
        lat, parts, dropped, errors = [], [], 0, []
        for _ in groups:
            kind, value = results.get(timeout=seconds + start_timeout)
            if kind == "error":
                errors.append(value)
            else:
                lat += value["latencies"]
                parts += value["parts"]
                dropped += value["dropped"]
        stats = scheduler.stats()
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        scheduler.close()
        for s in shms:
            s.close()
            s.unlink()
    if errors:
        return {"streams": n_streams, "processes": len(groups), "error": errors[0]}
    lat = np.asarray(lat, float)
    lm = stats["landmarks"]
    items, batches = lm["items"] - base["items"], lm["batches"] - base["batches"]
    out = {"streams": n_streams, "processes": len(groups), "frames": int(lat.size), "dropped": dropped,
           "drop_rate": round(dropped / max(lat.size + dropped, 1), 4),
           "fps_per_stream": round(lat.size / n_streams / seconds, 2),
           "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
           "latency_ms_p95": round(float(np.percentile(lat, 95)), 2) if lat.size else None,
           "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
           "landmark_mean_batch": round(items / max(batches, 1), 2),
           "landmark_batch_run_ms_median": lm["run_ms_median"],
           "expired": sum(v["expired"] for v in stats.values()), "startup_s": round(startup, 1),
           "regress": "batched on the device" if "regress" in stats else "per face in the session processes"}
    if "regress" in stats:
        out["regress_mean_batch"] = stats["regress"]["mean_batch"]
        out["regress_batch_run_ms_median"] = stats["regress"]["run_ms_median"]
    out.update(_latency_parts(lat, parts))
    out["held"] = bool(lat.size and out["latency_ms_p95"] <= 15.0 and out["drop_rate"] <= 0.01)
    return out


def _latency_parts(lat: np.ndarray, parts: list) -> dict:
    """Where a frame's latency goes (p50 / p95 ms): the tracker's landmark and regression calls (each including
    its queueing in the network process), the tracker's whole run, the wait before it (the stream's previous
    frame still running), and the latency of frames with and without a detector run."""
    if not lat.size:
        return {}
    det, lm, reg, total = (np.asarray(a, float) for a in zip(*parts))
    det = det.astype(bool)

    def pct(a):
        return [round(float(np.percentile(a, 50)), 2), round(float(np.percentile(a, 95)), 2)] if a.size else None

    return {"parts_ms_p50_p95": {"landmarks": pct(lm), "regress": pct(reg), "tracker": pct(total),
                                 "before_tracker": pct(lat - total)},
            "detect_frames": round(float(det.mean()), 4),
            "latency_ms_p50_p95_detect_frames": pct(lat[det]),
            "latency_ms_p50_p95_tracked_frames": pct(lat[~det])}


def load_clips(media: Path, names, n_frames: int = 60, size: int = 512) -> list[np.ndarray]:
    from engine.bench_gpu import load_frames

    return [np.stack(load_frames(media, [name], n_frames, size)) for name in names]


def processes_for(n_streams: int, per_process: int) -> int:
    return math.ceil(n_streams / per_process)
