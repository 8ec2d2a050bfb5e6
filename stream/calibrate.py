"""Live calibration for a session: neutral and ranges captures over the session's own frames, and
loading a profile into a running tracker. The captures reuse calibration/capture.py's summaries, so a
profile made live and one made by `facestream calibrate` from a video mean the same thing."""
from __future__ import annotations

import numpy as np

from calibration.capture import Tracked, neutral_from, ranges_from, shape_distance, stillest_window
from calibration.profile import Identity, Profile

CAPTURES = ("neutral", "ranges", "identity")
MIN_FRAMES = 5


def detach_profile(tracker):
    saved = tracker.profile
    tracker.profile = None
    return saved


def reattach_profile(tracker, saved) -> None:
    if tracker.profile is None:  # a capture may have stored a new profile meanwhile
        tracker.profile = saved


def apply_profile(tracker, profile: Profile | None) -> None:
    """Use `profile` for this tracker from the next frame; its identity (if any) is held from now on."""
    tracker.profile = profile
    if profile is not None and profile.identity_coefficients is not None:
        tracker.identity = profile.identity_coefficients.copy()
        tracker.identity_samples = tracker.config.identity_frames


def _tracked(states, fps: float) -> Tracked:
    faces = [s for s in states if s.face]
    if len(faces) < MIN_FRAMES:
        raise ValueError(f"only {len(faces)} frames with a face during the capture; look at the camera and retry")
    return Tracked(np.array([s.blendshapes for s in faces]), np.array([s.euler_deg for s in faces]),
                   np.array([s.identity for s in faces]), fps)


def start_identity(tracker) -> None:
    """Re-calibrate the identity: the tracker estimates it again over its next near-frontal frames."""
    tracker.identity_samples = 0


def capture_done(session, cap, elapsed: float) -> bool:
    if cap.what == "identity":  # done when the tracker holds a new estimate; `seconds` is the time limit
        return session.tracker.identity_locked and len(cap.states) >= MIN_FRAMES
    return elapsed >= cap.seconds


def finish_capture(session, cap) -> dict:
    """Summarise a finished capture into the session's profile; returns the stored values."""
    fps = len(cap.states) / max(cap.seconds, 1e-3)
    t = _tracked(cap.states, fps)
    profile = cap.profile or Profile(name=f"session-{session.id}")
    if cap.what == "neutral":
        window = stillest_window(t, seconds=min(1.0, 0.5 * cap.seconds))
        profile.neutral = neutral_from(t, window)
        result = {"blendshapes": profile.neutral.blendshapes, "head_euler_deg": profile.neutral.head_euler_deg,
                  "frames": profile.neutral.frames}
    elif cap.what == "identity":
        final = session.tracker.identity.copy()
        model = session.tracker.model
        spread = float(np.sqrt(np.mean([shape_distance(model, f, final) ** 2 for f in t.identity])))
        profile.identity = Identity([float(c) for c in final], len(t.identity), round(spread, 4))
        result = {"frames": profile.identity.frames, "spread_cm": profile.identity.spread}
    else:
        profile.ranges = ranges_from(t, profile.neutral)
        result = {"maximum": profile.ranges.maximum, "gamma": profile.ranges.gamma, "frames": profile.ranges.frames}
    apply_profile(session.tracker, profile)
    return result
