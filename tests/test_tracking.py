"""End-to-end tracking on the shared real media: faces found, values valid, blinks visible, no-face
video stays face: false, every message validates against the shipped JSON Schema."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.arkit import ARKIT_NAMES
from engine.media import MediaSource
from engine.messages import build_message, validate_message

from conftest import media_path


def track(pack, name: str, max_frames: int | None = None, **config):
    from engine.tracker import TrackerConfig

    tracker = pack.tracker(TrackerConfig(**config))
    states = []
    for frame in itertools.islice(MediaSource(media_path(name)).frames(), max_frames):
        states.append(tracker.process(frame.rgb, frame.index, pts=frame.pts, t_seconds=frame.pts))
    return states


@pytest.mark.parametrize("name", ["liveportrait_d0.mp4", "liveportrait_d10.mp4", "sadtalker_WDA_KatieHill_000.mp4",
                                  "pcavs_vox_620900105.mp4"])
def test_face_found_on_video_frames_with_valid_messages(pack, name):
    states = track(pack, name, max_frames=60)
    found = sum(s.face for s in states)
    assert found >= 0.95 * len(states), f"face found on {found}/{len(states)} frames of {name}"
    for s in states:
        msg = build_message(s, "test", include_landmarks68=True)
        validate_message(msg)
        if s.face:
            assert list(msg["blendshapes"]) == list(ARKIT_NAMES)
            assert all(0.0 <= v <= 1.0 for v in msg["blendshapes"].values())
            assert len(msg["landmarks68"]) == 68
            assert 0.1 < msg["head"]["translation_m"][2] < 3.0  # the head is in front of the camera
            assert set(msg["timing_ms"]) >= {"landmarks", "regress", "total"}


def test_no_face_video_is_face_false_throughout(pack):
    states = track(pack, "no_face.mp4")
    assert states, "no_face.mp4 decoded no frames"
    assert not any(s.face for s in states)
    for s in states:
        validate_message(build_message(s, "test"))


def test_fitted_landmarks_follow_the_network_landmarks(pack):
    """The fitted mesh's 68 points land near the face the network saw (within 6% of face size)."""
    states = [s for s in track(pack, "liveportrait_d0.mp4", max_frames=40) if s.face]
    errs = []
    for s in states:
        lm = s.landmarks[:468, :2]
        size = np.ptp(lm[:, 0]) + np.ptp(lm[:, 1])
        # MediaPipe's points nearest to the fitted 68 points
        d = np.linalg.norm(s.landmarks68[:, None, :] - lm[None], axis=2).min(1)
        errs.append(np.median(d) / size)
    assert np.median(errs) < 0.06, f"median fitted-to-network distance {np.median(errs):.3f} of face size"


def test_eye_closure_shows_as_a_peak_of_eye_blink(pack):
    """liveportrait_d3: the woman closes both eyes around frames 112-160 (checked by eye on the frames)
    and opens them wide, surprised, around 296-350."""
    states = track(pack, "liveportrait_d3.mp4")
    assert all(s.face for s in states)
    blink = np.array([[s.blendshapes[ARKIT_NAMES.index("eyeBlinkLeft")],
                       s.blendshapes[ARKIT_NAMES.index("eyeBlinkRight")]] for s in states]).mean(1)
    closed, wide = blink[112:160].mean(), blink[296:350].mean()
    baseline = np.median(blink)
    assert closed > 0.5, f"eyes-closed segment: mean eyeBlink {closed:.2f}"
    assert wide < 0.25, f"eyes-wide segment: mean eyeBlink {wide:.2f}"
    assert closed > baseline + 0.3, f"closed {closed:.2f} vs median {baseline:.2f}"


def test_lost_face_gives_face_false_then_reacquires(pack):
    """Face video -> a stretch of frames without a face -> the face again: the tracker reports
    face: false while it is gone and finds it again through the detector."""
    from engine.tracker import TrackerConfig

    face = [f.rgb for f in itertools.islice(MediaSource(media_path("liveportrait_d0.mp4")).frames(), 10)]
    h, w = face[0].shape[:2]
    empty = [np.asarray(__import__("PIL.Image").Image.fromarray(f.rgb).resize((w, h)))
             for f in itertools.islice(MediaSource(media_path("no_face.mp4")).frames(), 10)]
    tracker = pack.tracker(TrackerConfig(detect_every=0))
    seq = face + empty + face
    states = [tracker.process(np.ascontiguousarray(img), i, t_seconds=i / 25) for i, img in enumerate(seq)]
    flags = [s.face for s in states]
    assert all(flags[:10]), flags
    assert not any(flags[10:20]), flags
    assert all(flags[21:30]), flags  # re-acquired within one frame


def test_prdl_refinement_in_the_tracker_reports_its_time_and_loss(pack):
    """With PRDL on, each face message carries the refinement's loss before/after and its time."""
    from engine.tracker import TrackerConfig

    tracker = pack.tracker(TrackerConfig(prdl=True), masks="landmarks")
    frames = itertools.islice(MediaSource(media_path("liveportrait_d3.mp4")).frames(), 20)
    states = [tracker.process(f.rgb, f.index, pts=f.pts, t_seconds=f.pts) for f in frames]
    assert all(s.face for s in states)
    for s in states:
        msg = build_message(s, "test")
        validate_message(msg)
        assert msg["prdl"]["loss_after"] <= msg["prdl"]["loss_before"]
        assert {"segment", "prdl"} <= set(msg["timing_ms"])
        assert all(0.0 <= v <= 1.0 for v in msg["blendshapes"].values())


def test_redetection_verdict_moves_the_track_only_to_a_face_elsewhere(pack):
    """A re-detection's answer (taken on the frame after it was asked) moves a track whose region holds no
    detected face to the detected face, and leaves the track alone when it agrees, saw no face, failed, or came
    from a frame of another size."""
    from concurrent.futures import Future

    from engine.media import load_image
    from engine.tracker import TrackerConfig

    rgb = load_image(media_path("liveportrait_img_d9.jpg"))
    h, w = rgb.shape[:2]
    moved = np.ascontiguousarray(np.roll(rgb, w // 3, axis=1))  # the same face a third of the width to the right
    tracker = pack.tracker(TrackerConfig(filter=False))
    assert tracker.process(rgb, 0).face

    def verdict(answer, frame=moved):
        start = tracker.roi
        fut: Future = Future()
        fut.set_exception(answer) if isinstance(answer, Exception) else fut.set_result(answer)
        tracker._redetect = (fut, frame)
        timings: dict = {}
        tracker._apply_redetection(w, h, timings)
        assert tracker._redetect is None and ("redetect_wait" in timings) == (frame.shape == moved.shape)
        moved_by = tracker.roi.cx - start.cx
        tracker.roi = start
        return moved_by

    here, there = pack.detector(rgb), pack.detector(moved)
    assert here and there
    assert verdict(here) == 0.0  # agrees: the tighter landmark ROI is kept
    assert abs(verdict(there) - w // 3) < 0.1 * w  # the track's region holds no detected face: moved
    assert verdict([]) == 0.0  # the detector saw nothing: the landmark presence score decides
    assert verdict(RuntimeError("stage failed")) == 0.0
    assert verdict(there, frame=np.zeros((h, w + 2, 3), np.uint8)) == 0.0  # a frame of another size: stale


def test_batched_redetection_runs_beside_the_frame(pack):
    """With a batched detector the periodic re-detection is sent with the frame and answered on the next one:
    no tracked frame runs the detector on its own path, the detect stage still sees every due frame, and the
    face is tracked throughout."""
    from engine.batching import BatchScheduler
    from engine.tracker import TrackerConfig

    frames = [f.rgb for f in itertools.islice(MediaSource(media_path("liveportrait_d3.mp4")).frames(), 13)]
    with BatchScheduler(pack, max_wait_ms=1.0) as scheduler:
        session = scheduler.session(TrackerConfig(detect_every=4, filter=False))
        states = [session.process(rgb, i) for i, rgb in enumerate(frames)]
        detected = scheduler.stats()["detect"]["items"]
    assert all(s.face for s in states)
    on_path = [i for i, s in enumerate(states) if "detect" in s.timings_ms]
    answered = [i for i, s in enumerate(states) if "redetect_wait" in s.timings_ms]
    assert on_path == [0]  # only the first frame (no track yet) waits for the detector
    assert answered == [5, 9]  # asked on frames 4 and 8 (frame 12's answer is still pending)
    assert detected == 4  # frame 0 on the path, 4, 8 and 12 beside it


def test_loaded_pack_is_kept_out_of_full_collections(pack):
    """torch and the networks (~200k objects) are frozen once loaded: a full garbage collection would walk them
    all (~100 ms on the 2-core CPU, a stall of every session of the process)."""
    import gc

    assert gc.get_freeze_count() > 100_000


def test_face_lost_on_a_frame_sent_for_redetection_is_detected_once(pack):
    """The frame that starts a re-detection loses the face: its lost-face retry takes that detection's answer
    instead of running the detector on the same frame again."""
    from PIL import Image

    from engine.batching import BatchScheduler
    from engine.tracker import TrackerConfig

    face = [f.rgb for f in itertools.islice(MediaSource(media_path("liveportrait_d3.mp4")).frames(), 6)]
    h, w = face[0].shape[:2]
    empty = np.asarray(Image.fromarray(next(iter(MediaSource(media_path("no_face.mp4")).frames())).rgb).resize((w, h)))
    seq = face[:4] + [np.ascontiguousarray(empty)] + face[4:]
    with BatchScheduler(pack, max_wait_ms=1.0) as scheduler:
        session = scheduler.session(TrackerConfig(detect_every=4, filter=False))
        states = [session.process(rgb, i) for i, rgb in enumerate(seq)]
        detected = scheduler.stats()["detect"]["items"]
    assert [s.face for s in states] == [True] * 4 + [False, True, True]
    assert "detect" in states[4].timings_ms  # the retry waited for the re-detection sent with that frame
    assert detected == 3  # frame 0, frame 4 once, frame 5 (a new track)
