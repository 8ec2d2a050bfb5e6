"""Checkerboard views rendered through a known pinhole camera (no distortion), for calibration tests and demos.

The board is a plane of `pattern` = (cols, rows) inner corners, `square_cm` apart, with one square of white
paper around the squares (the quiet zone OpenCV's detector needs). Its inner corner (i, j) sits at
(i * square_cm, j * square_cm, 0) on the board, the order `calibration.camera.board_points` uses. Every pixel
is shaded by casting supersampled rays through the camera onto the plane (exact perspective, box-filtered
anti-aliasing), over a grey background with a soft gradient and mild sensor noise. Pixel centres are at
integer coordinates (OpenCV's convention), so a calibration of these frames should return the camera given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.geometry import Camera, rodrigues

BLACK, WHITE = 30.0, 215.0  # grey levels of the printed squares and the paper


@dataclass(frozen=True)
class BoardPose:
    """Board-to-camera transform: x_cam = rotation @ (p_board - centre) + translation (centimetres)."""

    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,) board centre in the camera frame


def board_centre(pattern: tuple[int, int], square_cm: float) -> np.ndarray:
    cols, rows = pattern
    return np.array([(cols - 1) * square_cm / 2.0, (rows - 1) * square_cm / 2.0, 0.0])


def paper_corners(pattern: tuple[int, int], square_cm: float) -> np.ndarray:
    """(4, 3) corners of the sheet (squares plus a one-square white border) on the board plane."""
    cols, rows = pattern
    lo_x, hi_x = -2.0 * square_cm, (cols + 1) * square_cm
    lo_y, hi_y = -2.0 * square_cm, (rows + 1) * square_cm
    return np.array([[lo_x, lo_y, 0.0], [hi_x, lo_y, 0.0], [hi_x, hi_y, 0.0], [lo_x, hi_y, 0.0]])


def _to_camera(points: np.ndarray, pose: BoardPose, centre: np.ndarray) -> np.ndarray:
    return (points - centre) @ pose.rotation.T + pose.translation


def project_corners(camera: Camera, pose: BoardPose, pattern: tuple[int, int], square_cm: float) -> np.ndarray:
    """(cols * rows, 2) true pixel positions of the inner corners (OpenCV order)."""
    cols, rows = pattern
    grid = np.mgrid[0:cols, 0:rows].T.reshape(-1, 2) * float(square_cm)
    pts = np.concatenate([grid, np.zeros((len(grid), 1))], axis=1)
    return camera.project(_to_camera(pts, pose, board_centre(pattern, square_cm)))


def sample_poses(camera: Camera, n: int, pattern: tuple[int, int] = (9, 6), square_cm: float = 2.5,
                 seed: int = 0, max_tilt_deg: float = 35.0, min_tilt_deg: float = 10.0,
                 max_roll_deg: float = 30.0, fill: tuple[float, float] = (0.35, 0.75)) -> list[BoardPose]:
    """n board poses with the whole sheet in view: tilts of min..max_tilt_deg about in-plane axes that turn
    round the views (so tilt directions are spread evenly), random roll, distance such that the sheet spans
    `fill` of the image width, and a random position in the image."""
    rng = np.random.default_rng(seed)
    centre = board_centre(pattern, square_cm)
    paper = paper_corners(pattern, square_cm)
    sheet_w = float(paper[1, 0] - paper[0, 0])
    k_inv = np.linalg.inv(np.array([[camera.fx, 0, camera.cx], [0, camera.fy, camera.cy], [0, 0, 1.0]]))
    pad = 4.0
    poses: list[BoardPose] = []
    phase = rng.uniform(0, 2 * math.pi)
    for i in range(n):
        for _attempt in range(1000):
            phi = phase + 2 * math.pi * i / max(n, 1) + rng.normal(0, 0.3)
            tilt = math.radians(rng.uniform(min_tilt_deg, max_tilt_deg))
            roll = math.radians(rng.uniform(-max_roll_deg, max_roll_deg))
            rot = rodrigues(np.array([math.cos(phi), math.sin(phi), 0.0]) * tilt) @ rodrigues(np.array([0.0, 0.0, roll]))
            span = rng.uniform(*fill) * camera.width
            z = camera.fx * sheet_w / span
            uv = np.array([rng.uniform(0.2, 0.8) * camera.width, rng.uniform(0.2, 0.8) * camera.height, 1.0])
            pose = BoardPose(rot, z * (k_inv @ uv))
            cam_pts = _to_camera(paper, pose, centre)
            if (cam_pts[:, 2] <= 0.1 * z).any():
                continue
            px = camera.project(cam_pts)
            if (px[:, 0] >= pad - 0.5).all() and (px[:, 0] <= camera.width - 0.5 - pad).all() and \
                    (px[:, 1] >= pad - 0.5).all() and (px[:, 1] <= camera.height - 0.5 - pad).all():
                poses.append(pose)
                break
        else:
            raise ValueError(f"no board pose fits a {camera.width}x{camera.height} image; lower `fill`")
    return poses


def render_board(camera: Camera, pose: BoardPose | None, pattern: tuple[int, int] = (9, 6),
                 square_cm: float = 2.5, rng: np.random.Generator | None = None, supersample: int = 3,
                 noise: float = 2.0) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame; pose None renders the background only."""
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = camera.height, camera.width
    ss = int(supersample)
    # background: grey with a soft random gradient
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = rng.uniform(-25, 25, 2)
    img = (rng.uniform(105, 150) + g[0] * (xx / w - 0.5) + g[1] * (yy / h - 0.5)).astype(np.float32)

    if pose is not None:
        centre = board_centre(pattern, square_cm)
        paper = paper_corners(pattern, square_cm)
        px = camera.project(_to_camera(paper, pose, centre))
        x0, y0 = np.clip(np.floor(px.min(0)).astype(int) - 1, 0, [w, h])
        x1, y1 = np.clip(np.ceil(px.max(0)).astype(int) + 2, 0, [w, h])
        if x1 > x0 and y1 > y0:
            # homography board (X, Y, 1) -> pixels, then its inverse for the rays
            k = np.array([[camera.fx, 0, camera.cx], [0, camera.fy, camera.cy], [0, 0, 1.0]])
            t0 = pose.translation - pose.rotation @ centre
            hom = k @ np.column_stack([pose.rotation[:, 0], pose.rotation[:, 1], t0])
            hinv = np.linalg.inv(hom)
            offs = (np.arange(ss) + 0.5) / ss - 0.5  # sub-sample offsets within a pixel
            us = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1)
            vs = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1)
            u, v = us[None, :], vs[:, None]
            wq = hinv[2, 0] * u + hinv[2, 1] * v + hinv[2, 2]  # = 1 / depth, > 0 in front of the camera
            bx = (hinv[0, 0] * u + hinv[0, 1] * v + hinv[0, 2]) / wq
            by = (hinv[1, 0] * u + hinv[1, 1] * v + hinv[1, 2]) / wq
            cols, rows = pattern
            s = float(square_cm)
            on_paper = (wq > 0) & (bx >= -2 * s) & (bx <= (cols + 1) * s) & (by >= -2 * s) & (by <= (rows + 1) * s)
            on_squares = (bx >= -s) & (bx <= cols * s) & (by >= -s) & (by <= rows * s)
            dark = ((np.floor(bx / s) + np.floor(by / s)) % 2 == 0) & on_squares
            light = rng.uniform(0.85, 1.1)  # exposure of the board
            shade = np.where(dark, BLACK, WHITE) * light
            bg = np.repeat(np.repeat(img[y0:y1, x0:x1], ss, axis=0), ss, axis=1)
            sub = np.where(on_paper, shade, bg)
            img[y0:y1, x0:x1] = sub.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))

    img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    gray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def render_board_frames(camera: Camera, n_frames: int = 20, pattern: tuple[int, int] = (9, 6),
                        square_cm: float = 2.5, seed: int = 0, supersample: int = 3, noise: float = 2.0,
                        poses: list[BoardPose] | None = None) -> list[np.ndarray]:
    """n_frames RGB views of the board at varied poses (see sample_poses), or at the poses given."""
    poses = poses if poses is not None else sample_poses(camera, n_frames, pattern, square_cm, seed)
    rng = np.random.default_rng(seed + 1)
    return [render_board(camera, p, pattern, square_cm, rng, supersample, noise) for p in poses]


def write_board_video(path: str | Path, camera: Camera, n_frames: int = 20, pattern: tuple[int, int] = (9, 6),
                      square_cm: float = 2.5, seed: int = 0, fps: float = 10.0, blank_frames: int = 0,
                      supersample: int = 3) -> Path:
    """An H.264 mp4 of n_frames board views (one frame each) followed by blank_frames without the board."""
    from engine.media import VideoWriter

    path = Path(path)
    if camera.width % 2 or camera.height % 2:
        raise ValueError(f"video needs an even size (yuv420p), got {camera.width}x{camera.height}")
    frames = render_board_frames(camera, n_frames, pattern, square_cm, seed, supersample) if n_frames else []
    rng = np.random.default_rng(seed + 2)
    frames += [render_board(camera, None, pattern, square_cm, rng) for _ in range(blank_frames)]
    writer = VideoWriter(path, fps, camera.width, camera.height)
    try:
        for f in frames:
            writer.write(f)
    finally:
        writer.close()
    return path
