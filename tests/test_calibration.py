"""Calibration profiles: exact round trip, clear errors for corrupt or foreign files, and a neutral
capture that brings the resting face toward zero."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from calibration.profile import Identity, Neutral, Profile, ProfileError, Ranges
from engine.arkit import ARKIT_NAMES
from engine.messages import FaceState

from conftest import ROOT, media_path


def full_profile() -> Profile:
    from calibration.camera import from_fov

    return Profile(name="tester", camera=from_fov("webcam", 640, 480, 62.0).to_dict(),
                   identity=Identity([0.01 * k for k in range(100)], 40, 0.12),
                   neutral=Neutral({n: 0.1 for n in ARKIT_NAMES[:10]}, (1.0, -2.0, 0.5), 25),
                   ranges=Ranges({"eyeBlinkLeft": 0.8, "jawOpen": 0.6}, 0.8, 300), relative_head_pose=True)


def test_profile_round_trips_exactly(tmp_path):
    p = full_profile()
    path = tmp_path / "p.json"
    p.save(path)
    q = Profile.load(path)
    assert q.to_dict() == p.to_dict()


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "not JSON"),
    ('{"format": "something-else", "version": 1}', "not a facestream profile"),
    ('{"format": "facestream-profile", "version": 99}', "version"),
    ('{"format": "facestream-profile", "version": 1, "neutral": {"blendshapes": {"smile": 0.2}, '
     '"head_euler_deg": [0, 0, 0], "frames": 3}}', "unknown blendshape"),
    ('{"format": "facestream-profile", "version": 1, "identity": {"coefficients": [1, 2], "frames": 1, '
     '"spread_cm": 0}}', "identity needs 100"),
])
def test_corrupt_or_foreign_profile_is_a_clear_error(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=fragment):
        Profile.load(path)


def test_remap_puts_rest_at_zero_and_full_range_at_one():
    p = Profile(neutral=Neutral({"jawOpen": 0.2}, (0.0, 0.0, 0.0), 10), ranges=Ranges({"jawOpen": 0.7}, 1.0))
    k = ARKIT_NAMES.index("jawOpen")
    for raw, want in ((0.2, 0.0), (0.7, 1.0), (0.45, 0.5)):
        bs = np.zeros(len(ARKIT_NAMES))
        bs[k] = raw
        s = FaceState(frame=0, pts=None, ts_capture=0.0, face=True, blendshapes=bs)
        p.apply(s)
        assert s.blendshapes[k] == pytest.approx(want)


def test_track_with_a_corrupt_profile_warns_and_goes_on(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = subprocess.run([sys.executable, "-m", "engine.cli", "track", str(media_path("d3d_000002.jpg")), "--out",
                          str(tmp_path / "o"), "--no-overlay", "--profile", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "not JSON" in res.stderr and "Traceback" not in res.stderr
    msg = json.loads((tmp_path / "o" / "coefficients.jsonl").read_text().splitlines()[0])
    assert msg["face"] is True


def test_neutral_capture_brings_the_resting_face_toward_zero(pack, tmp_path):
    """liveportrait_d0: the man rests in frames 0-20 and again in 60-78 (checked by eye). Calibrating the
    neutral on the first rest must at least halve the mean blendshape value on the second and bring it to
    <= 0.05 (measured on the second rest, not the captured one)."""
    from calibration import capture

    video = media_path("liveportrait_d0.mp4")
    profile = Profile(neutral=capture.neutral_from(capture.track_video(pack, video, 0, 20), (0, 20)))
    raw = capture.track_video(pack, video).blendshapes[60:78]
    tracker = pack.tracker(profile=profile)
    from engine.media import MediaSource

    cal = np.array([s.blendshapes for s in (tracker.process(f.rgb, f.index, pts=f.pts, t_seconds=f.pts)
                                            for f in MediaSource(video).frames())][60:78])
    assert cal.mean() < 0.5 * raw.mean(), f"rest mean {raw.mean():.3f} -> {cal.mean():.3f}"
    assert cal.mean() <= 0.05, f"calibrated rest mean {cal.mean():.3f} (issue bar: <= 0.05)"


def test_identity_halves_of_one_video_agree_better_than_two_people(pack):
    """Metric: mean distance (cm) between the 468 neutral-expression landmarks of two identity estimates."""
    from calibration import capture

    d10 = media_path("liveportrait_d10.mp4")
    first = capture.identity_from(pack, capture.track_video(pack, d10, 0, 220, fit_identity_frames=10**9))
    second = capture.identity_from(pack, capture.track_video(pack, d10, 220, None, fit_identity_frames=10**9))
    other = capture.identity_from(pack, capture.track_video(pack, media_path("liveportrait_d3.mp4"), 0, 170,
                                                            fit_identity_frames=10**9))
    same = capture.shape_distance(pack.model, np.array(first.coefficients), np.array(second.coefficients))
    cross = min(capture.shape_distance(pack.model, np.array(h.coefficients), np.array(other.coefficients))
                for h in (first, second))
    assert same < 0.5 * cross, f"same person {same:.3f} cm vs two people {cross:.3f} cm"
