"""Synthetic faces with known coefficients, for evaluating refinement (`facestream eval-prdl`).

A face is drawn from the face model (random identity, head pose, one of the expression cases users care
about), rendered to ground-truth part masks, and its expression is then degraded the way a weak
regressor errs: closed eyes reported open, asymmetry averaged away, strong shapes damped, plus noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.face_model import FaceModel
from engine.geometry import FLIP, Camera, euler_to_matrix

CASES = ("eyes_closed", "one_eye_closed", "asymmetric_smile", "jaw_open", "frown", "pucker")


@dataclass
class SyntheticFace:
    case: str
    identity: np.ndarray  # (100,)
    expression: np.ndarray  # (53,) ground truth
    perturbed: np.ndarray  # (53,) the weak regressor's answer
    perturbed_mask: np.ndarray  # (53,) bool: shapes the perturbation changed on purpose
    rotation_cam: np.ndarray  # (3, 3) ground truth
    translation: np.ndarray  # (3,) cm
    rotation_cam_start: np.ndarray  # pose the refinement starts from (slightly off)
    translation_start: np.ndarray
    camera: Camera


def _set(exp: np.ndarray, names: tuple[str, ...], model: FaceModel, value) -> None:
    for n in names:
        exp[model.exp_names.index(n)] = value


def sample_expression(model: FaceModel, case: str, rng: np.random.Generator) -> np.ndarray:
    e = np.zeros(model.n_exp)
    # a little of everything else, as real faces have
    others = rng.choice(model.n_exp, size=4, replace=False)
    e[others] = rng.uniform(0.0, 0.15, size=4)
    idx = model.exp_names.index
    if case == "eyes_closed":
        v = rng.uniform(0.85, 1.0)
        _set(e, ("eyeBlink_L", "eyeBlink_R"), model, v)
    elif case == "one_eye_closed":
        side = rng.choice(["_L", "_R"])
        e[idx("eyeBlink" + side)] = rng.uniform(0.85, 1.0)
        e[idx("eyeBlink" + ("_R" if side == "_L" else "_L"))] = 0.0
    elif case == "asymmetric_smile":
        strong, weak = ("_L", "_R") if rng.random() < 0.5 else ("_R", "_L")
        e[idx("mouthSmile" + strong)] = rng.uniform(0.6, 1.0)
        e[idx("mouthSmile" + weak)] = rng.uniform(0.0, 0.15)
    elif case == "jaw_open":
        e[idx("jawOpen")] = rng.uniform(0.4, 0.8)
    elif case == "frown":
        _set(e, ("browDown_L", "browDown_R"), model, rng.uniform(0.6, 1.0))
        _set(e, ("mouthFrown_L", "mouthFrown_R"), model, rng.uniform(0.3, 0.7))
    elif case == "pucker":
        e[idx("mouthPucker")] = rng.uniform(0.6, 1.0)
    else:
        raise ValueError(f"unknown case {case}")
    e[idx("mouthClose")] = min(e[idx("mouthClose")], e[idx("jawOpen")])
    return e


def perturb_expression(model: FaceModel, e: np.ndarray, rng: np.random.Generator,
                       noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """A weak regressor's answer: blinks removed, left/right averaged, strong shapes damped, noise."""
    p = e.copy()
    names = model.exp_names
    for k, n in enumerate(names):
        if n.startswith("eyeBlink"):
            p[k] = 0.1 * e[k]
    for k, n in enumerate(names):
        if n.endswith("_L") and n[:-2] + "_R" in names:
            r = names.index(n[:-2] + "_R")
            if not n.startswith("eyeBlink"):
                p[k] = p[r] = 0.5 * (e[k] + e[r])
    for n in ("jawOpen", "mouthPucker", "browDown_L", "browDown_R", "mouthFrown_L", "mouthFrown_R"):
        p[names.index(n)] *= 0.5
    changed = np.abs(p - e) > 0.05
    p = np.clip(p + rng.normal(0.0, noise, size=p.shape), 0.0, 1.0)
    return p, changed


def sample_face(model: FaceModel, case: str, rng: np.random.Generator, size: int = 224,
                hfov_deg: float = 20.0) -> SyntheticFace:
    identity = np.zeros(model.n_id)
    identity[:30] = rng.normal(0.0, 0.8, 30)
    e = sample_expression(model, case, rng)
    p, changed = perturb_expression(model, e, rng)
    yaw, pitch, roll = rng.uniform(-45, 45), rng.uniform(-15, 15), rng.uniform(-10, 10)
    rc = FLIP @ euler_to_matrix(yaw, pitch, roll)
    cam = Camera.from_fov(size, size, hfov_deg)
    # distance so that the face (about 16 cm wide) fills about 60 % of the image
    t = np.array([rng.normal(0, 0.3), rng.normal(-1.0, 0.3), 0.0])
    t[2] = 0.5 * 16.0 / 0.6 / np.tan(np.radians(hfov_deg) / 2)
    d_rot = euler_to_matrix(*rng.normal(0.0, 1.5, 3))
    rc_start = FLIP @ d_rot @ FLIP @ rc
    t_start = t + rng.normal(0.0, [0.2, 0.2, 0.8])
    return SyntheticFace(case, identity, e, p, changed, rc, t, rc_start, t_start, cam)
