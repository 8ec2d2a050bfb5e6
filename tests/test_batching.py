"""The batching scheduler (engine/batching.py) on CPU with the torch backend: concurrent sessions, results
equal to unbatched per-face calls, deadlines."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from conftest import media_path
from engine.batching import BatchScheduler, DeadlineExceeded, StageBatcher

# Batched vs single-face landmark network runs differ only by float32 summation order inside the batched
# convolutions: measured <= 3e-4 px on the shared media; the tolerance leaves 6x headroom.
POINT_TOL_PX = 2e-3
SCORE_TOL = 1e-4


def _in_threads(fn, args) -> None:
    """fn(a) for every a, each in its own thread, all at once; returns when all are done."""
    threads = [threading.Thread(target=fn, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _frames(name: str, n: int) -> list[np.ndarray]:
    from engine.media import MediaSource

    return [f.rgb for _, f in zip(range(n), MediaSource(media_path(name)).frames())]


@pytest.fixture(scope="module")
def faces(pack):
    """(image tensor, roi) for faces of 3 real videos and a two-person photo."""
    from PIL import Image

    from engine.networks.preprocess import roi_from_detection

    frames = _frames("liveportrait_d0.mp4", 4) + _frames("liveportrait_d3.mp4", 4) + _frames("tps_driving.mp4", 4)
    frames.append(np.asarray(Image.open(media_path("fr_two_people.jpg")).convert("RGB")))
    items = []
    for rgb in frames:
        image = pack.landmarker.to_tensor(rgb)
        for det in pack.detector(rgb):
            items.append((image, roi_from_detection(det, rgb.shape[1], rgb.shape[0])))
    assert len(items) >= 13
    return items


def test_concurrent_sessions_get_their_own_results(pack, faces):
    stage = StageBatcher(pack.landmarker.batch, max_batch=64, max_wait_ms=20.0, name="landmarks")
    n_sessions = 6
    results: dict[int, list] = {}
    barrier = threading.Barrier(n_sessions)

    def session(k: int):
        mine = faces[k::n_sessions]
        barrier.wait()
        results[k] = [stage.call(item, deadline=time.perf_counter() + 30.0) for item in mine]

    _in_threads(session, range(n_sessions))
    stage.close()
    summary = stage.stats.summary()
    assert summary["items"] == len(faces) and summary["expired"] == 0
    assert summary["max_batch"] > 1, "concurrent submissions were never batched together"
    for k in range(n_sessions):
        for (image, roi), (pts, score) in zip(faces[k::n_sessions], results[k]):
            ref_pts, ref_score = pack.landmarker(image, roi)
            assert np.abs(pts - ref_pts).max() < POINT_TOL_PX
            assert abs(score - ref_score) < SCORE_TOL


def test_landmarker_batch_matches_single_calls(pack, faces):
    batched = pack.landmarker.batch(faces)
    assert len(batched) == len(faces)
    worst = max(np.abs(b[0] - pack.landmarker(*f)[0]).max() for f, b in zip(faces, batched))
    assert worst < POINT_TOL_PX


def test_detector_batch_matches_single_calls(pack):
    from PIL import Image

    frames = _frames("liveportrait_d0.mp4", 2) + [np.asarray(Image.open(media_path("fr_two_people.jpg")).convert("RGB"))]
    for rgb, dets in zip(frames, pack.detector.batch(frames)):
        ref = pack.detector(rgb)
        assert len(dets) == len(ref) >= 1
        for d, r in zip(dets, ref):
            assert abs(d.score - r.score) < 1e-5
            assert np.abs(np.array(d.box) - np.array(r.box)).max() < 1e-3


def test_window_closes_before_the_deadline():
    seen = []

    def double(items):
        seen.append(list(items))
        return [2 * x for x in items]

    # a wide margin: the test must hold on a loaded 2-core machine, where a thread can wake tens of ms late
    stage = StageBatcher(double, max_batch=8, max_wait_ms=1500.0, name="t", margin_ms=100.0)
    try:
        t0 = time.perf_counter()
        assert stage.call(1) == 2  # no deadline: waits out the window for company
        assert time.perf_counter() - t0 >= 1.4
        t0 = time.perf_counter()
        assert stage.call(3, deadline=t0 + 0.3) == 6  # dispatched before its deadline, not after 1.5 s
        assert time.perf_counter() - t0 < 0.3
        assert stage.stats.expired == 0
    finally:
        stage.close()


def test_expired_items_are_not_run():
    seen = []
    stage = StageBatcher(lambda items: seen.extend(items) or list(items), max_batch=8, max_wait_ms=1.0, name="t")
    try:
        late = stage.submit("late", deadline=time.perf_counter() - 0.001)
        ok = stage.submit("ok", deadline=time.perf_counter() + 5.0)
        assert ok.result(timeout=5) == "ok"
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=5)
        assert seen == ["ok"]
        assert stage.stats.expired == 1
    finally:
        stage.close()


def test_call_gives_up_at_the_deadline_while_the_stage_is_busy():
    seen = []

    def slow(items):
        seen.extend(items)
        time.sleep(0.3)
        return list(items)

    stage = StageBatcher(slow, max_batch=1, max_wait_ms=0.0, name="t")
    try:
        busy = stage.submit("first")
        time.sleep(0.05)  # the worker is now inside slow(["first"])
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            stage.call("second", deadline=t0 + 0.05)
        waited = time.perf_counter() - t0
        assert 0.04 <= waited < 0.2  # returned at its deadline, not when the busy batch finished
        assert busy.result(timeout=5) == "first"
        time.sleep(0.05)
        assert seen == ["first"]  # the withdrawn item never ran
        assert stage.stats.withdrawn == 1
    finally:
        stage.close()


def test_asyncio_sessions():
    stage = StageBatcher(lambda items: [x * x for x in items], max_batch=64, max_wait_ms=20.0, name="t")

    async def main():
        return await asyncio.gather(*(stage.submit_async(i, deadline=time.perf_counter() + 5.0) for i in range(10)))

    try:
        assert asyncio.run(main()) == [i * i for i in range(10)]
        assert stage.stats.batches <= 2
    finally:
        stage.close()


def test_stage_errors_reach_every_caller():
    """A stage that fails on every batch: all callers get its error, and after the first two single runs fail too
    the rest are not run one by one."""
    runs = []

    def broken(items):
        runs.append(len(items))
        raise RuntimeError("device lost")

    stage = StageBatcher(broken, max_batch=8, max_wait_ms=20.0, name="t")
    try:
        futs = [stage.submit(i) for i in range(6)]
        for f in futs:
            with pytest.raises(RuntimeError, match="device lost"):
                f.result(timeout=5)
        assert runs == [6, 1, 1]
    finally:
        stage.close()


def test_one_bad_item_fails_only_its_caller():
    """A batch that raises because of one item is run again item by item: the other sessions get their results."""
    stage = StageBatcher(lambda items: [10.0 / x for x in items], max_batch=8, max_wait_ms=20.0, name="t")
    try:
        futs = [stage.submit(x) for x in (1.0, 2.0, 0.0, 5.0)]
        assert [f.result(timeout=5) for f in (futs[0], futs[1], futs[3])] == [10.0, 5.0, 2.0]
        with pytest.raises(ZeroDivisionError):
            futs[2].result(timeout=5)
        assert stage.stats.split == 1 and stage.stats.summary()["split"] == 1
        assert stage.stats.items == 3  # the three single runs that gave results
    finally:
        stage.close()


def test_items_past_their_deadline_are_not_run_one_by_one():
    """Re-running a failed batch item by item checks each item's deadline first."""
    def slow(items):
        time.sleep(0.03)
        return [10.0 / x for x in items]

    stage = StageBatcher(slow, max_batch=8, max_wait_ms=5.0, name="t", margin_ms=0.0)
    try:
        deadline = time.perf_counter() + 0.2
        futs = [stage.submit(x, deadline) for x in (0.0, 1.0, 2.0, 4.0, 5.0, 8.0, 10.0, 20.0)]
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result(timeout=5))
            except (ZeroDivisionError, DeadlineExceeded) as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes[0] == "ZeroDivisionError"
        assert "DeadlineExceeded" in outcomes and stage.stats.expired >= 1  # 30 ms per single run, 200 ms to go
        assert outcomes[1] == 10.0
    finally:
        stage.close()


def test_batched_sessions_track_like_unbatched_trackers(pack):
    """3 streams tracked concurrently through the scheduler give what 3 unbatched trackers give.

    Every frame starts a new track (reset_track, as `facestream track` does for photos): on a continuing
    track each frame is cropped at the previous frame's landmarks, so the batched network's ~1e-4 px rounding
    would move the next crop and the uint8-quantised crop pixels with it, and the comparison would measure
    the tracker's sensitivity to its own ROI (up to ~0.15 px and 0.1 in a coefficient over 10 frames, measured)
    rather than the scheduler. Starting afresh keeps the comparison tight enough that a result routed to the
    wrong session or frame cannot pass."""
    from engine.tracker import TrackerConfig

    videos = ("liveportrait_d0.mp4", "liveportrait_d3.mp4", "tps_driving.mp4")
    clips = {v: _frames(v, 8) for v in videos}
    config = TrackerConfig(filter=False, prdl=False)
    reference = {}
    for v in videos:
        tracker = pack.tracker(config)
        reference[v] = []
        for i, rgb in enumerate(clips[v]):
            tracker.reset_track()
            reference[v].append(tracker.process(rgb, i))
    batched: dict[str, list] = {}
    with BatchScheduler(pack, max_wait_ms=5.0) as scheduler:
        def run(v):
            session = scheduler.session(config)
            batched[v] = []
            for i, rgb in enumerate(clips[v]):
                session.tracker.reset_track()
                batched[v].append(session.process(rgb, i, deadline=time.perf_counter() + 30.0))

        _in_threads(run, videos)
        stats = scheduler.stats()
    assert stats["landmarks"]["items"] == 24 and stats["detect"]["items"] == 24
    assert stats["landmarks"]["max_batch"] > 1 or stats["detect"]["max_batch"] > 1
    worst = {"px": 0.0, "exp": 0.0, "cm": 0.0}
    for v in videos:
        assert len(batched[v]) == len(reference[v]) == 8
        for a, b in zip(batched[v], reference[v]):
            assert a.face and b.face and a.frame == b.frame
            worst["px"] = max(worst["px"], float(np.abs(a.landmarks - b.landmarks).max()))
            worst["exp"] = max(worst["exp"], float(np.abs(a.expression - b.expression).max()))
            worst["cm"] = max(worst["cm"], float(np.abs(a.translation_cm - b.translation_cm).max()))
    print("batched vs unbatched tracking, worst differences:", worst)
    assert worst["px"] < POINT_TOL_PX
    assert worst["exp"] < 2e-3  # coefficients are on a 0..1 scale
    assert worst["cm"] < 2e-3


def test_deadline_drops_the_frame_and_the_session_goes_on(pack):
    from engine.tracker import TrackerConfig

    frames = _frames("liveportrait_d0.mp4", 3)
    with BatchScheduler(pack, max_wait_ms=1.0) as scheduler:
        session = scheduler.session(TrackerConfig(filter=False, prdl=False))
        with pytest.raises(DeadlineExceeded):
            session.process(frames[0], 0, deadline=time.perf_counter() - 1e-3)
        states = [session.process(rgb, i + 1, deadline=time.perf_counter() + 30.0) for i, rgb in enumerate(frames[1:])]
        assert all(s.face for s in states)
        assert scheduler.stats()["detect"]["expired"] + scheduler.detect.stats.withdrawn == 1


def test_prdl_sessions_refine_like_the_pack_tracker(pack):
    """With config.prdl a scheduler session refines (per face, in its own thread) as pack.tracker does."""
    from engine.tracker import TrackerConfig

    frames = _frames("liveportrait_d3.mp4", 2)
    config = TrackerConfig(filter=False, prdl=True)
    ref = pack.tracker(config)
    expected = [ref.process(rgb, i) for i, rgb in enumerate(frames)]
    with BatchScheduler(pack, max_wait_ms=1.0) as scheduler:
        session = scheduler.session(config)
        got = [session.process(rgb, i, deadline=time.perf_counter() + 30.0) for i, rgb in enumerate(frames)]
    for a, b in zip(got, expected):
        assert a.prdl is not None and b.prdl is not None
        assert np.abs(a.expression - b.expression).max() < 1e-6


def test_refine_stage_refines_like_the_pack_tracker(pack):
    """With device stages (here on the CPU: torch, eagerly) a PRDL session's refinement goes through the shared
    refine stage (`engine.refine_torch`) and gives the per-face NumPy refinement's answer to float32 rounding."""
    from engine.tracker import TrackerConfig

    frames = _frames("liveportrait_d3.mp4", 3)
    config = TrackerConfig(filter=False, prdl=True, identity_frames=0)
    ref = pack.tracker(config)
    expected = [ref.process(rgb, i) for i, rgb in enumerate(frames)]
    with BatchScheduler(pack, max_wait_ms=1.0, device_stages=True) as scheduler:
        session = scheduler.session(config)
        got = [session.process(rgb, i, deadline=time.perf_counter() + 60.0) for i, rgb in enumerate(frames)]
        stats = scheduler.stats()
    assert stats["refine"]["items"] == len(frames)
    for a, b in zip(got, expected):
        assert a.prdl is not None and b.prdl is not None
        assert a.prdl["iterations"] == b.prdl["iterations"]
        assert a.prdl["loss_after"] == pytest.approx(b.prdl["loss_after"], rel=0.02, abs=1e-3)
        assert np.abs(a.expression - b.expression).max() < 0.02


def test_regress_stage_tracks_like_the_session_regressor(pack):
    """Tracked faces regressed through the shared regress stage (batched Gauss-Newton, here on the CPU) get the
    per-face regressor's answer; one session at a time, so the network batches are the same in both runs."""
    from engine.tracker import TrackerConfig

    config = TrackerConfig(filter=False, prdl=False, identity_frames=0)  # every frame after the first is tracked
    frames = _frames("liveportrait_d3.mp4", 10)
    runs = {}
    for batched in (False, True):
        with BatchScheduler(pack, device_stages=batched) as scheduler:
            session = scheduler.session(config)
            runs[batched] = [session.process(rgb, i, deadline=time.perf_counter() + 30.0) for i, rgb in enumerate(frames)]
            stats = scheduler.stats()
        if batched:
            assert stats["regress"]["items"] == len(frames) - 1  # the first frame is a new track: regressed locally
        else:
            assert "regress" not in stats
    for a, b in zip(runs[False], runs[True]):
        assert a.face and b.face
        assert np.abs(a.expression - b.expression).max() < 1e-6
        assert np.abs(a.translation_cm - b.translation_cm).max() < 1e-6


def test_concurrent_sessions_share_the_regress_stage(pack):
    from engine.tracker import TrackerConfig

    config = TrackerConfig(filter=False, prdl=False, identity_frames=0)
    videos = ("liveportrait_d0.mp4", "liveportrait_d3.mp4", "tps_driving.mp4")
    clips = {v: _frames(v, 8) for v in videos}
    out: dict[str, list] = {}
    with BatchScheduler(pack, max_wait_ms=5.0, device_stages=True) as scheduler:
        def run(v):
            session = scheduler.session(config)
            out[v] = [session.process(rgb, i, deadline=time.perf_counter() + 30.0) for i, rgb in enumerate(clips[v])]

        _in_threads(run, videos)
        stats = scheduler.stats()
    assert stats["regress"]["items"] == 3 * 7 and stats["regress"]["max_batch"] > 1
    assert all(s.face for v in videos for s in out[v])
