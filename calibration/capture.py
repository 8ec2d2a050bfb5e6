"""Calibration captures from a video: the resting face, expression ranges and the user's identity.

Each capture tracks the video with the ordinary tracker (no profile applied) and summarises what it saw.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from calibration.profile import MIN_SPAN, Identity, Neutral, Ranges
from engine.arkit import ARKIT_NAMES
from engine.media import MediaSource
from engine.tracker import TrackerConfig

STILL_SECONDS = 1.0  # length of the resting window picked automatically
REST_BAND_SIGMAS = 3.0  # resting jitter below this many robust standard deviations reads as 0


@dataclass
class Tracked:
    blendshapes: np.ndarray  # (T, 52), NaN rows where no face
    euler: np.ndarray  # (T, 3)
    identity: np.ndarray  # (T, 100) per-frame identity estimates (NaN where none)
    fps: float


def track_video(pack, path, start: int = 0, end: int | None = None, fit_identity_frames: int | None = None,
                config: TrackerConfig | None = None) -> Tracked:
    """Track frames [start, end) of a video, image or folder; no profile is applied."""
    cfg = config or TrackerConfig()
    if fit_identity_frames is not None:
        cfg.identity_frames = fit_identity_frames
    source = MediaSource(path)
    tracker = pack.tracker(cfg)
    bs, eu, ids = [], [], []
    for frame in itertools.islice(source.frames(), start, end):
        s = tracker.process(frame.rgb, frame.index, pts=frame.pts, t_seconds=frame.pts)
        if s.face:
            bs.append(s.blendshapes)
            eu.append(s.euler_deg)
            ids.append(s.identity)
        else:
            bs.append(np.full(len(ARKIT_NAMES), np.nan))
            eu.append((np.nan,) * 3)
            ids.append(np.full(pack.model.n_id, np.nan))
    if not bs:
        raise ValueError(f"{path}: no frames in the range {start}..{end}")
    return Tracked(np.array(bs), np.array(eu), np.array(ids), source.fps or 25.0)


def stillest_window(t: Tracked, seconds: float = STILL_SECONDS) -> tuple[int, int]:
    """Frame range [a, b) of the given length with the least face motion (blendshapes and head pose)."""
    n = len(t.blendshapes)
    w = max(2, min(n, int(round(seconds * t.fps))))
    motion = np.nansum(np.abs(np.diff(t.blendshapes, axis=0)), axis=1) + 0.02 * np.nansum(
        np.abs(np.diff(t.euler, axis=0)), axis=1)
    motion = np.concatenate([[0.0], motion])
    missing = np.isnan(t.blendshapes[:, 0]).astype(float) * 1e3
    cost = np.convolve(motion + missing, np.ones(w), mode="valid")
    a = int(np.argmin(cost))
    return a, a + w


def neutral_from(t: Tracked, window: tuple[int, int] | None = None) -> Neutral:
    a, b = window or stillest_window(t)
    seg = t.blendshapes[a:b]
    ok = ~np.isnan(seg[:, 0])
    if ok.sum() < 3:
        raise ValueError("too few frames with a face in the resting segment")
    # the rest level is the top of the resting band, median + 3 robust standard deviations (1.4826 MAD), so
    # the jitter of a still face maps to 0 and a blink or two inside the window does not move it
    med = np.nanmedian(seg[ok], axis=0)
    band = REST_BAND_SIGMAS * 1.4826 * np.nanmedian(np.abs(seg[ok] - med), axis=0)
    rest = np.clip(med + band, 0.0, 1.0)
    euler = np.nanmedian(t.euler[a:b][ok], axis=0)
    return Neutral({n: round(float(v), 4) for n, v in zip(ARKIT_NAMES, rest)},
                   tuple(round(float(v), 3) for v in euler), int(ok.sum()))


def ranges_from(t: Tracked, neutral: Neutral | None, percentile: float = 98.0, gamma: float = 0.8) -> Ranges:
    """Per blendshape, the user's full expression: a high percentile of what the capture reached.
    Blendshapes the capture barely moved keep the full 0..1 range."""
    ok = ~np.isnan(t.blendshapes[:, 0])
    top = np.percentile(t.blendshapes[ok], percentile, axis=0)
    rest = np.array([neutral.blendshapes.get(n, 0.0) for n in ARKIT_NAMES]) if neutral else np.zeros(len(top))
    maximum = {}
    for n, hi, lo in zip(ARKIT_NAMES, top, rest):
        if hi - lo >= 4 * MIN_SPAN:  # the capture really exercised this shape
            maximum[n] = round(float(hi), 4)
    return Ranges(maximum, gamma, int(ok.sum()))


def identity_from(pack, t: Tracked) -> Identity:
    """The identity as the tracker's running multi-frame estimate over every near-frontal frame, with
    the spread of the per-frame estimates around it (in cm over the 468 landmarks)."""
    ok = ~np.isnan(t.identity[:, 0])
    if ok.sum() < 5:
        raise ValueError("too few frames with a face to estimate the identity")
    per_frame = t.identity[ok]
    final = per_frame.mean(axis=0)
    spread = float(np.sqrt(np.mean([shape_distance(pack.model, f, final) ** 2 for f in per_frame])))
    return Identity([float(c) for c in final], int(ok.sum()), round(spread, 4))


def shape_distance(model, id_a: np.ndarray, id_b: np.ndarray) -> float:
    """Mean distance (cm) between the 468 neutral-expression landmarks of two identities: the metric for
    how much two identity estimates differ in face shape."""
    zero = np.zeros(model.n_exp)
    a = model.landmarks(id_a, zero)[:468]
    b = model.landmarks(id_b, zero)[:468]
    return float(np.linalg.norm(a - b, axis=1).mean())
